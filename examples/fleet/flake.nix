# Three NixOS hosts, one index.json, one hub mirror: the fleet of examples/fleet/README.md.
# The same host modules are handed to nixos-rebuild (nixosConfigurations), colmena
# (colmenaHive) and deploy-rs (deploy.nodes); use whichever you already run.
{
  description = "A model-zoo fleet: thor, legion and sprout deployed from one flake and one index.json";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # This repository (a clone, or its git URL). From this checkout:
    #   nix flake lock --override-input model-zoo path:$PWD/../..
    model-zoo.url = "git+file:///srv/model-zoo";
    model-zoo.inputs.nixpkgs.follows = "nixpkgs";
    colmena.url = "github:nix-community/colmena";
    colmena.inputs.nixpkgs.follows = "nixpkgs";
    deploy-rs.url = "github:serokell/deploy-rs";
    deploy-rs.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs =
    {
      self,
      nixpkgs,
      model-zoo,
      colmena,
      deploy-rs,
    }:
    let
      inherit (nixpkgs) lib;

      # The one list of machines. Each name is the host's id in index.json (hosts.<id>)
      # and its networking.hostName, so each reconciles only its own slice.
      hosts = {
        thor = { system = "x86_64-linux"; address = "thor.lan"; };
        legion = { system = "x86_64-linux"; address = "legion.lan"; };
        sprout = { system = "aarch64-linux"; address = "sprout.lan"; };
      };

      # One nixpkgs instance per platform, shared by the three tools so they build the
      # same systems. CUDA for the x86_64 GPU hosts: torch is built against it (unfree).
      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          config = {
            allowUnfree = system == "x86_64-linux";
            cudaSupport = system == "x86_64-linux";
          };
        };

      modulesOf = name: [
        model-zoo.nixosModules.default
        ./hosts/common.nix
        (./hosts + "/${name}.nix")
      ];
    in
    {
      # nixos-rebuild switch --flake .#thor --target-host root@thor.lan
      nixosConfigurations = lib.mapAttrs (
        name: host:
        lib.nixosSystem {
          modules = modulesOf name ++ [ { nixpkgs.pkgs = pkgsFor host.system; } ];
        }
      ) hosts;

      # colmena apply (all hosts at once) or colmena apply --on sprout
      colmenaHive = colmena.lib.makeHive (
        {
          meta = {
            nixpkgs = pkgsFor "x86_64-linux";
            nodeNixpkgs = lib.mapAttrs (_: host: pkgsFor host.system) hosts;
          };
        }
        // lib.mapAttrs (name: host: {
          deployment.targetHost = host.address;
          deployment.tags = [ "model-zoo" ];
          imports = modulesOf name;
        }) hosts
      );

      # deploy .  (all nodes) or deploy .#sprout
      deploy.nodes = lib.mapAttrs (name: host: {
        hostname = host.address;
        profiles.system = {
          user = "root";
          path = deploy-rs.lib.${host.system}.activate.nixos self.nixosConfigurations.${name};
        };
      }) hosts;

      # deploy-rs' schema and activation checks (`nix flake check`).
      checks = lib.mapAttrs (_: deployLib: deployLib.deployChecks self.deploy) deploy-rs.lib;
    };
}
