# The option reference of modules/model-zoo.nix (services.model-zoo), as nixpkgs' own manual
# builds it: lib.optionAttrSetToDocList over the evaluated module's options. Read by
# `.ci/nixos-options`, which writes docs/nixos-options.md. Only the options are evaluated,
# so the stand-ins below are what their declarations need, nothing that a configuration would.
{ nixpkgsLib }:
let
  lib = import nixpkgsLib;
  inherit (lib) mkOption types;
  fakeDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  pkgs = {
    zoo-agent = fakeDrv "zoo-agent-0.1.0" // { meta.mainProgram = "zoo-agent"; };
    # nixpkgs' pkgs.formats.json (pkgs-lib/formats.nix): its value type is what the docs show.
    formats.json = _: {
      type = types.attrsOf types.anything // { description = "JSON value"; };
      generate = name: _: fakeDrv name;
    };
    runCommand = name: _: _: fakeDrv name;
  };
  evaluated = lib.evalModules {
    modules = [
      ../modules/model-zoo.nix
      { options.networking.hostName = mkOption { type = types.str; default = "nixos"; }; }
      # The module also defines NixOS options (systemd.services, users, ...) that are not
      # declared here: no check of its definitions, only of its declarations.
      { _module.args.pkgs = pkgs; _module.check = false; }
    ];
  };
  visible = o: o.visible && !o.internal;
in
map (o: {
  inherit (o) name description type readOnly;
  default = o.default or null;
  example = o.example or null;
}) (builtins.filter visible (lib.optionAttrSetToDocList evaluated.options.services.model-zoo))
