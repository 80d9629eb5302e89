# Evaluates modules/model-zoo.nix with the real nixpkgs `lib` and a small stand-in for the
# NixOS options the module sets (full nixpkgs cannot be fetched here: no channel is reachable).
# The stand-ins are loose on purpose: they check nothing the real options would, they
# only let the module's own types, assertions and definitions be evaluated.
{
  nixpkgsLib,
  configuration,
  # More stand-ins, and what else to report from the evaluated config (fleet-eval.nix).
  extraModules ? [ ],
  report ? (_config: { }),
}:
let
  lib = import nixpkgsLib;
  inherit (lib) mkOption types;

  # nixpkgs' pkgs.formats.json value type (pkgs-lib/formats.nix), restated.
  jsonValue =
    with types;
    let
      v =
        nullOr (oneOf [ bool int float str path (attrsOf v) (listOf v) ])
        // { description = "JSON value"; };
    in
    v;
  fakeDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  pkgs = {
    zoo-agent = fakeDrv "zoo-agent-0.1.0" // { meta.mainProgram = "zoo-agent"; };
    llama-cpp = fakeDrv "llama-cpp-6981" // { meta.mainProgram = "llama-cli"; };
    formats.json = _: {
      type = jsonValue;
      # A real file, so the test can run `zoo-agent validate` on what Nix would build.
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
    runCommand = name: _env: script: fakeDrv name // { inherit script; };
  };

  nixosStandIn = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      meta.maintainers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      networking.hostName = mkOption { type = types.str; default = "nixos"; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      users.users = mkOption { type = types.attrsOf (types.attrsOf types.anything); default = { }; };
      users.groups = mkOption { type = types.attrsOf (types.attrsOf types.anything); default = { }; };
      systemd.tmpfiles.settings = mkOption { type = types.attrsOf types.anything; default = { }; };
      services.prometheus.scrapeConfigs = mkOption { type = types.listOf types.anything; default = [ ]; };
      services.prometheus.exporters.node.enable = mkOption { type = types.bool; default = false; };
      services.prometheus.exporters.node.extraFlags = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          freeformType = types.attrsOf types.anything;
          options.serviceConfig = mkOption { type = types.attrsOf types.anything; default = { }; };
          options.environment = mkOption { type = types.attrsOf types.str; default = { }; };
        });
      };
      systemd.timers = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          freeformType = types.attrsOf types.anything;
          options.timerConfig = mkOption { type = types.attrsOf types.anything; default = { }; };
        });
      };
    };
  };

  evaluated = lib.evalModules {
    modules = [
      ../../modules/model-zoo.nix
      nixosStandIn
      configuration
      { _module.args.pkgs = pkgs; }
    ] ++ extraModules;
  };
  inherit (evaluated) config;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
in
# Like NixOS, report failed assertions instead of evaluating the system they guard.
if failedAssertions != [ ] then
  { inherit failedAssertions; }
else
{
  inherit failedAssertions;
  inherit (config) warnings users networking;
  prometheus = config.services.prometheus;
  services = lib.mapAttrs (_: s: {
    inherit (s) serviceConfig environment;
    unit = builtins.removeAttrs s [ "serviceConfig" "environment" ];
  }) config.systemd.services;
  timers = config.systemd.timers;
  tmpfiles = config.systemd.tmpfiles.settings;
  # What the build-time validation runs (the stand-in runCommand keeps its script).
  indexScripts = map (d: d.script) (config.systemd.services.model-zoo-reconcile.restartTriggers or [ ]);
}
// report config
