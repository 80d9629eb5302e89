# Calls flake.nix's outputs with the real nixpkgs `lib` and a stand-in package set, to
# check its shape and that the package's dependencies are the ones pyproject.toml names.
{ nixpkgsLib }:
let
  lib = import nixpkgsLib;
  flake = import ../../flake.nix;
  pythonPackage = name: { pname = name; };
  python3Packages = {
    buildPythonApplication = attrs: attrs // { type = "derivation"; outPath = "/nix/store/00000000000000000000000000000000-${attrs.pname}"; };
  } // lib.genAttrs [ "click" "gguf" "huggingface-hub" "jsonschema" "ollama" "pydantic" "tqdm" "fastapi" "peft" "prometheus-client" "torch" "transformers" "uvicorn" "hatchling" ] pythonPackage;
  pkgs = {
    inherit lib python3Packages;
    callPackage = path: overrides: import path ({ inherit lib python3Packages; } // overrides);
  };
  self = outputs;
  outputs = flake.outputs {
    inherit self;
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: pkgs);
    };
  };
  package = outputs.packages.x86_64-linux.default;
in
{
  inputs = builtins.attrNames flake.inputs;
  outputs = builtins.attrNames outputs;
  systems = builtins.attrNames outputs.packages;
  package = {
    inherit (package) pname version pyproject;
    dependencies = map (p: p.pname) package.dependencies;
    buildSystem = map (p: p.pname) package.build-system;
    inherit (package.meta) mainProgram;
  };
  overlayAttrs = builtins.attrNames (outputs.overlays.default pkgs { });
  moduleImports = map toString outputs.nixosModules.default.imports;
}
