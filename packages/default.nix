# The agent, with the resident's dependencies from nixpkgs (torch, transformers, peft...).
{
  lib,
  python3Packages,
}:
let
  pyproject = lib.importTOML ../pyproject.toml;
in
python3Packages.buildPythonApplication {
  pname = "zoo-agent";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../zoo_agent
    ];
  };

  build-system = [ python3Packages.hatchling ];

  dependencies = with python3Packages; [
    click
    gguf  # the GGUF header reader the memory fit uses for llama.cpp models
    huggingface-hub
    jsonschema
    ollama
    pydantic
    tqdm
    # The resident (the `resident` extra).
    fastapi
    peft
    prometheus-client
    torch
    transformers
    uvicorn
  ];

  pythonImportsCheck = [
    "zoo_agent"
    "zoo_agent.plan"
  ];

  meta = {
    description = (pyproject.project.description);
    license = lib.licenses.mit;
    mainProgram = "zoo-agent";
    platforms = lib.platforms.linux;
  };
}
