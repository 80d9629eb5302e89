# Evaluates examples/fleet/flake.nix's outputs offline: every host as nixos-rebuild,
# colmena and deploy-rs would get it, through eval.nix (the real lib and our module, a
# stand-in for the rest of NixOS). The inputs are stand-ins: nixpkgs' lib is real but
# `nixosSystem` is eval.nix, `import nixpkgs { ... }` returns its own arguments, colmena's
# makeHive is the identity and deploy-rs' activate.nixos wraps the configuration.
{
  nixpkgsLib,
  # True while modules/model-zoo.nix does not declare resident.fleetKeyFile yet: a
  # stand-in declares it (checked for nothing), so the rest still evaluates.
  declareFleetKey ? false,
}:
let
  lib = import nixpkgsLib;
  inherit (lib) mkOption types;
  systems = [ "x86_64-linux" "aarch64-linux" ];

  # The NixOS options the example sets beyond ours, loose: they are only recorded.
  standIn = {
    options = {
      nixpkgs.pkgs = mkOption { type = types.unspecified; default = null; };
      nixpkgs.overlays = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      system.stateVersion = mkOption { type = types.str; };
      hardware.graphics.enable = mkOption { type = types.bool; default = false; };
      hardware.nvidia.open = mkOption { type = types.nullOr types.bool; default = null; };
      services.xserver.videoDrivers = mkOption { type = types.listOf types.str; default = [ ]; };
      deployment = mkOption { type = types.attrsOf types.anything; default = { }; };
    };
  };
  fleetKeyStandIn = {
    options.services.model-zoo.resident.fleetKeyFile = mkOption { type = types.nullOr types.str; default = null; };
  };

  evalHost =
    modules:
    import ./eval.nix {
      nixpkgsLib = nixpkgsLib;
      configuration = { imports = modules; };
      extraModules = [ standIn ] ++ lib.optional declareFleetKey fleetKeyStandIn;
      report = config: {
        hostName = config.networking.hostName;
        pkgs = config.nixpkgs.pkgs;
        overlays = builtins.length config.nixpkgs.overlays;
        inherit (config) deployment;
        fleetKeyFile = config.services.model-zoo.resident.fleetKeyFile or null;
      };
    };

  nixpkgs = {
    lib = lib // { nixosSystem = { modules, ... }: evalHost modules; };
    # `import nixpkgs { system = ...; config = ...; }` gives back what it was asked for.
    outPath = builtins.toFile "stand-in-nixpkgs.nix" "args: builtins.removeAttrs args [ \"overlays\" ]";
  };
  model-zoo =
    let
      self = (import ../../flake.nix).outputs {
        inherit self;
        nixpkgs = { inherit lib; legacyPackages = { }; };
      };
    in
    self;
  colmena.lib.makeHive = hive: hive;
  deploy-rs.lib = lib.genAttrs systems (system: {
    activate.nixos = configuration: { inherit system configuration; };
    deployChecks = _deploy: { };
  });

  flake = import ../../examples/fleet/flake.nix;
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs model-zoo colmena deploy-rs;
  };
  hive = outputs.colmenaHive;
  nodes = builtins.removeAttrs hive [ "meta" ];
in
{
  inputs = builtins.attrNames flake.inputs;
  outputs = builtins.attrNames outputs;
  nixos = outputs.nixosConfigurations;
  colmena = lib.mapAttrs (name: node: evalHost [ node ] // { nixpkgs = hive.meta.nodeNixpkgs.${name}; }) nodes;
  colmenaDefault = hive.meta.nixpkgs;
  deploy = lib.mapAttrs (_: node: {
    inherit (node) hostname;
    inherit (node.profiles.system) user;
    inherit (node.profiles.system.path) system;
    hostName = node.profiles.system.path.configuration.hostName;
  }) outputs.deploy.nodes;
  checks = builtins.attrNames outputs.checks;
}
