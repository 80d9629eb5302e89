# services.model-zoo: a declared model zoo, fetched and verified by a oneshot unit and
# served by a Type=notify resident. `zoo-agent systemd render` writes the same units for
# hosts without NixOS; tests/nix checks that the two agree.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    optional
    optionalAttrs
    optionals
    types
    ;

  cfg = config.services.model-zoo;
  json = pkgs.formats.json { };

  # Every value that reaches a unit file, typed and escaped as `zoo_agent/systemd/units.py`'s
  # `unit_value()` does (issue #17). A newline would end the directive and start another
  # (`ExecStartPre=…`), so no option that reaches a unit holds a control character.
  oneLine =
    type:
    types.addCheck type (v: builtins.match "[^[:cntrl:]]*" (toString v) != null)
    // {
      description = "${type.description} on one line (no control characters)";
    };
  # Written unquoted (LoadCredential= takes the rest of its line, OnCalendar= the whole
  # line): systemd would strip leading or trailing blanks and join the next line after a
  # trailing backslash.
  unquoted =
    type:
    types.addCheck (oneLine type) (v: builtins.match "([^[:space:]].*[^[:space:]\\]|[^[:space:]\\])" (toString v) != null)
    // {
      description = "${type.description} on one line, without leading or trailing blanks or a trailing backslash";
    };
  # systemd's strict user/group names: User= cannot be quoted.
  userName = types.strMatching "[A-Za-z_][A-Za-z0-9_-]{0,30}" // {
    description = "user or group name (letters, digits, '_' and '-', at most 31)";
  };
  # NixOS writes the tmpfiles.d path as '<path>' unescaped and the home into passwd, so
  # the zoo's path holds no quote, backslash, '%' (a tmpfiles specifier) or ':'.
  statePath = types.addCheck (oneLine types.path) (v: builtins.match "/[^'\"\\%:]*" (toString v) != null) // {
    description = "absolute path on one line without quotes, backslashes, '%' or ':'";
  };
  envName = "[A-Za-z_][A-Za-z0-9_]*";

  # systemd expands specifiers in every directive we write but MemoryMax=: double '%'.
  escapeSpecifiers = v: lib.replaceStrings [ "%" ] [ "%%" ] (toString v);
  # One "…" word with C escapes, where systemd splits words (toJSON writes a subset of
  # those escapes; control characters are refused above).
  quoted = v: builtins.toJSON (escapeSpecifiers v);
  # A command line as nixpkgs' utils.escapeSystemdExecArgs writes it, except that the
  # program's '$' is not doubled: systemd never substitutes variables in the path it runs
  # (a store path holds no '$'). '$' doubled in the arguments: no variable substitution.
  execLine =
    program: args:
    lib.concatStringsSep " " ([ (quoted program) ] ++ map (a: lib.replaceStrings [ "$" ] [ "$$" ] (quoted a)) args);

  # The index's keys that matter most, typed, so a typo fails evaluation with the option's
  # path; everything else stays freeform JSON (RFC 42) and `zoo-agent validate` checks it
  # at build time.
  sha256 = types.strMatching "[0-9a-f]{64}";
  id = types.strMatching "[a-z0-9][a-z0-9._-]{0,63}";
  artifact = {
    freeformType = json.type;
    options = {
      version = mkOption {
        type = types.str;
        description = "Version label; a new label is a new directory in the zoo.";
      };
      source = mkOption {
        type = types.submodule {
          freeformType = json.type;
          options.type = mkOption {
            type = types.enum [ "hf" "url" "file" "ollama" ];
            description = "Where the files come from.";
          };
        };
        description = "The pinned source (a hub commit, a URL, a local directory or an Ollama digest).";
      };
      files = mkOption {
        type = types.listOf (types.submodule {
          freeformType = json.type;
          options = {
            path = mkOption { type = types.str; description = "Path inside the version directory."; };
            sha256 = mkOption { type = sha256; description = "Lowercase hex SHA-256 of the file."; };
            size = mkOption { type = types.ints.positive; description = "Size in bytes."; };
          };
        });
        description = "Every file of this version, each with its hash.";
      };
    };
  };
  settingsType = types.submodule {
    freeformType = json.type;
    options = {
      models = mkOption {
        type = types.attrsOf (types.submodule artifact);
        default = { };
        description = "Base models by id.";
      };
      loras = mkOption {
        type = types.attrsOf (types.submodule {
          imports = [ artifact ];
          options = {
            base_model = mkOption { type = id; description = "Id of the model this adapter was trained for."; };
            rank = mkOption { type = types.ints.between 1 4096; description = "LoRA rank r."; };
          };
        });
        default = { };
        description = "LoRA adapters by id.";
      };
      tenants = mkOption {
        type = types.attrsOf (types.submodule {
          freeformType = json.type;
          options = {
            model = mkOption {
              type = types.nullOr id;
              default = null;
              description = "Id of the model to serve (null only for a remote tenant: `backend = \"openai\"` with `remote`, issue #36).";
            };
            pinned = mkOption {
              type = types.nullOr types.bool;
              default = null;
              description = "Never evicted from memory; loaded at start (null: the index's default, false).";
            };
            priority = mkOption {
              type = types.nullOr (types.enum [ "system" "realtime" "default" "batch" ]);
              default = null;
              description = "Class of this tenant's requests unless a request names one (null: \"default\").";
            };
            fetch = mkOption {
              type = types.nullOr (types.enum [ "eager" "on-demand" ]);
              default = null;
              description = "\"eager\": fetched by the reconcile unit; \"on-demand\": by its first request (null: \"eager\").";
            };
            overflow = mkOption {
              type = types.nullOr (types.enum [ "peers" "never" ]);
              default = null;
              description = "\"peers\": a peer that accepts this tenant answers when this host's queue is full or it does not fit (null: \"never\").";
            };
          };
        });
        default = { };
        description = "Tenants (a model, its adapters and serving settings) by id.";
      };
      hosts = mkOption {
        type = types.attrsOf (types.submodule {
          freeformType = json.type;
          options = {
            resident = mkOption {
              type = types.nullOr id;
              default = null;
              description = "Id of the one tenant this host serves (the same as `tenants = [ id ]`; exclusive with `tenants`).";
            };
            tenants = mkOption {
              type = types.nullOr (types.listOf id);
              default = null;
              description = "Ids of the tenants this host serves, in order.";
            };
            memory_budget = mkOption {
              type = types.nullOr (types.strMatching "[1-9][0-9]*[KMGT]?");
              default = null;
              example = "8G";
              description = "Memory the served tenants share, in systemd's notation (device memory on a CUDA host, RAM otherwise).";
            };
            endpoint = mkOption {
              type = types.nullOr (types.strMatching "https?://[^/?#@[:space:]]+");
              default = null;
              example = "http://sprout.lan:8000";
              description = "Base URL at which peers reach this host's resident: scheme, host and port, no path.";
            };
            accept_from_peers = mkOption {
              type = types.nullOr (types.listOf id);
              default = null;
              description = "Ids of served tenants this host answers for peers (null: none).";
            };
          };
        });
        default = { };
        description = "Hosts by id (their host names, lowercase).";
      };
    };
  };

  indexSource =
    if cfg.indexFile != null then
      cfg.indexFile
    else
      json.generate "model-zoo-index.json" (lib.filterAttrsRecursive (_: v: v != null) cfg.settings);

  # Validated at build time: a bad index fails `nixos-rebuild` before anything switches,
  # with the validator's one-line messages. A symlink, so relative `file` sources still
  # resolve next to the original index.
  index = pkgs.runCommand "model-zoo-index" { nativeBuildInputs = [ cfg.package ]; } ''
    zoo-agent validate ${lib.escapeShellArg indexSource}
    ln -s ${lib.escapeShellArg indexSource} $out
  '';

  zooAgent = lib.getExe' cfg.package "zoo-agent";

  # NixOS writes each as Environment=${toJSON "KEY=value"}: quoted, but '%' left for
  # systemd to expand, so it is doubled here (see `escapeSpecifiers`).
  environment = lib.mapAttrs (_: escapeSpecifiers) ({
    ZOO_ROOT = cfg.stateDir;
    ZOO_INDEX = "${index}";
    ZOO_HOST = cfg.hostName;
    PYTHONUNBUFFERED = "1";
  }
  // optionalAttrs (cfg.huggingFace.endpoint != null) { HF_ENDPOINT = cfg.huggingFace.endpoint; }
  // optionalAttrs cfg.offline { HF_HUB_OFFLINE = "1"; }
  // optionalAttrs cfg.ollama.enable { OLLAMA_HOST = cfg.ollama.host; });

  # Models with an `ollama` source are pulled by, and tenants with `backend = "ollama"`
  # served through, that daemon: start after it.
  ollamaUnits = optionals cfg.ollama.enable [ "ollama.service" ];

  # One flat block for every unit; `zoo_agent/systemd/units.py` holds the same (tests compare them).
  hardening = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateMounts = true;
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    # AF_INET/AF_INET6: the hub and the API; AF_UNIX: sd_notify and the worker sockets.
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
    # No ~@resources: torch's OpenMP threads call sched_setaffinity and oneDNN mbind.
    SystemCallFilter = [ "@system-service" "~@privileged" ];
    SystemCallErrorNumber = "EPERM";
    SystemCallArchitectures = "native";
    DevicePolicy = "closed";
    UMask = "0027";
    LockPersonality = true;
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectProc = "invisible";
    # Not "pid": the resident reads /proc/meminfo to decide whether two versions fit during
    # a reload; ProtectProc = "invisible" still hides other users' processes.
    ProcSubset = "all";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RemoveIPC = true;
    KeyringMode = "private";
    # MemoryDenyWriteExecute only on reconcile and verify: the resident loads torch, whose
    # oneDNN kernels are generated at run time into executable memory. PrivateDevices and
    # PrivateUsers are per unit: a GPU needs its device nodes and the video/render groups.
  };

  stateDirectory =
    if dirOf cfg.stateDir == "/var/lib" then
      {
        StateDirectory = quoted (baseNameOf cfg.stateDir);
        StateDirectoryMode = "0750";
      }
    else
      { ReadWritePaths = [ (quoted cfg.stateDir) ]; };

  common = {
    User = cfg.user;
    Group = cfg.group;
  }
  // stateDirectory
  // hardening;

  # node_exporter's textfile directory (issue #25): the reconcile and verify units write
  # their *.prom files there. '-': a missing directory never keeps a unit from starting.
  textfileDir = if cfg.prometheus.enable then cfg.prometheus.textfileDir else null;
  textfileEnv = optionalAttrs (textfileDir != null) { ZOO_TEXTFILE_DIR = textfileDir; };
  oneshot = common // lib.optionalAttrs (textfileDir != null) {
    ReadWritePaths = (stateDirectory.ReadWritePaths or [ ]) ++ [ (quoted "-${textfileDir}") ];
  };

  # The HF-cache view (issue #35): `zoo-agent export hf-cache` after each apply (and gc), in
  # the reconcile unit itself, so with its hardening; the one directory it may write besides
  # the zoo. '-': a missing directory fails the export, saying so, not the unit's namespace.
  hfCacheDir = if cfg.hfCache.enable then cfg.hfCache.directory else null;
  inside = dir: parent: lib.hasPrefix "${toString parent}/" "${toString dir}/";
  nodeExporter = config.services.prometheus.exporters.node.enable or false;

  # What Prometheus scrapes: the listen address, with a wildcard made loopback.
  scrapeTarget =
    let
      m = builtins.match "(.*):([0-9]+)" cfg.resident.listen;
      address = builtins.head m;
      local = { "0.0.0.0" = "127.0.0.1"; "[::]" = "[::1]"; "" = "127.0.0.1"; };
    in
    "${local.${address} or address}:${builtins.elemAt m 1}";

  noDevices = {
    MemoryDenyWriteExecute = true;
    PrivateDevices = true;
    PrivateUsers = true;
  };

  # LoadCredential=ID:PATH takes the rest of its line as the path: no quoting there.
  credential = name: path: "${name}:${escapeSpecifiers path}";
  hfCredential = optional (cfg.huggingFace.tokenFile != null) (credential "hf-token" cfg.huggingFace.tokenFile);

  gpuDevices = {
    none = [ ];
    nvidia = [ "char-nvidiactl" "char-nvidia-caps" "char-nvidia-frontend" "char-nvidia-uvm" ];
    rocm = [ "char-drm" "char-fb" "char-kfd" ];
  };

  listenPort =
    let
      m = builtins.match ".*:([0-9]+)" cfg.resident.listen;
    in
    if lib.hasPrefix "unix:" cfg.resident.listen || m == null then null else lib.toInt (builtins.head m);
in
{
  options.services.model-zoo = {
    enable = mkEnableOption "the model zoo: declared models fetched, verified and served";

    package = mkPackageOption pkgs "zoo-agent" { };

    stateDir = mkOption {
      type = statePath;
      default = "/var/lib/model-zoo";
      description = "Where the zoo lives: versioned model directories, manifests, host state.";
    };

    hostName = mkOption {
      type = oneLine types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = "This host's id in the index.";
    };

    user = mkOption {
      type = userName;
      default = "model-zoo";
      description = "User the units run as; owns the zoo.";
    };

    group = mkOption {
      type = userName;
      default = "model-zoo";
      description = "Group of the zoo; add another service's user to it to give it read access.";
    };

    indexFile = mkOption {
      type = types.nullOr (oneLine types.path);
      default = null;
      example = literalExpression "./index.json";
      description = "The index, as a file (e.g. the repository's `index.json`). Exclusive with `settings`.";
    };

    settings = mkOption {
      type = types.nullOr settingsType;
      default = null;
      description = ''
        The index, in Nix (see `schema.json`). `models.<id>.version`, `.source.type`,
        `.files.*.sha256`, `tenants.<id>.model`, `.pinned`, `.priority`, `.fetch`, `.overflow`, `hosts.<id>.resident`,
        `.tenants`, `.memory_budget`, `.endpoint` and `.accept_from_peers` are typed;
        the rest is passed through and validated at build time. Exclusive with `indexFile`.
      '';
    };

    huggingFace = {
      endpoint = mkOption {
        type = types.nullOr (oneLine types.str);
        default = null;
        example = "http://hub-mirror.internal:8090";
        description = "A hub mirror to fetch from (`HF_ENDPOINT`).";
      };
      tokenFile = mkOption {
        # externalPath refuses a Nix path literal, which would copy the secret into the store.
        type = types.nullOr (unquoted types.externalPath);
        default = null;
        example = "/run/secrets/hf-token";
        description = "File holding a Hugging Face token; passed with `LoadCredential=`, never copied to the store.";
      };
    };

    offline = mkOption {
      type = types.bool;
      default = false;
      description = "Never touch the network; `apply` reports what is missing.";
    };

    ollama = {
      enable = mkOption {
        type = types.bool;
        default = config.services.ollama.enable or false;
        defaultText = literalExpression "config.services.ollama.enable";
        description = ''
          Use an Ollama daemon (normally `services.ollama` on this host) for models with an
          `ollama` source and tenants with `backend = "ollama"`: the units start after
          `ollama.service` and reach it at `ollama.host`.
        '';
      };
      host = mkOption {
        type = oneLine types.str;
        default =
          let
            o = config.services.ollama or { };
          in
          "${o.host or "127.0.0.1"}:${toString (o.port or 11434)}";
        defaultText = literalExpression ''"''${config.services.ollama.host}:''${toString config.services.ollama.port}"'';
        description = "The daemon's address (`OLLAMA_HOST`).";
      };
    };

    resident = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Serve the host's tenant (`hosts.<host>.resident`) with the OpenAI-compatible API.";
      };
      listen = mkOption {
        type = oneLine types.str;
        default = "127.0.0.1:8000";
        example = "unix:/run/model-zoo/api.sock";
        description = "Address and port, or `unix:` and a socket path.";
      };
      apiKeyFile = mkOption {
        type = types.nullOr (unquoted types.externalPath);
        default = null;
        description = "Bearer token clients must send; passed with `LoadCredential=`. Required beyond loopback.";
      };
      fleetKeyFile = mkOption {
        type = types.nullOr (unquoted types.externalPath);
        default = null;
        description = ''
          The fleet key (issue #22): presented to the peers this host delegates to and required of
          peers that delegate here (`X-Zoo-Peer`), separate from the clients' `apiKeyFile`; passed
          with `LoadCredential=`. Without it this host neither asks nor answers peers.
        '';
      };
      priorityKeyFile = mkOption {
        type = types.nullOr (unquoted types.externalPath);
        default = null;
        description = ''
          The priority key (issue #31): a client key that may also ask for the classes above
          `default` (`X-Zoo-Priority: realtime` or `system`, a negative `priority`); with any
          other key they are refused (403). Passed with `LoadCredential=`; it must differ from
          `apiKeyFile` and `fleetKeyFile`.
        '';
      };
      credentials = mkOption {
        type = types.attrsOf (unquoted types.externalPath);
        default = { };
        example = literalExpression ''{ openai-key = "/run/secrets/openai-key"; }'';
        description = ''
          More credentials of the resident, by name, each passed with `LoadCredential=NAME:PATH` and
          never copied to the store: a remote tenant's key (issue #36), which its index entry names
          (`remote.key_file = "openai-key"`) and the resident reads from `$CREDENTIALS_DIRECTORY`.
          A name is letters, digits, `.`, `_` and `-`; not `api-key`, `fleet-key`, `priority-key` or `hf-token`.
        '';
      };
      watchdogSec = mkOption {
        type = types.ints.unsigned;
        default = 30;
        description = "`WatchdogSec=`; the resident pings only while its serving loop makes progress. 0 disables.";
      };
      memoryMax = mkOption {
        # Written as is: '%' is a percentage of RAM here, not a specifier.
        type = types.nullOr (
          types.strMatching "[0-9]+([.][0-9]+)?[KMGTPE]?|[0-9]+([.][0-9]+)?%|infinity"
          // {
            description = "memory size (bytes with an optional K/M/G/T/P/E suffix, a percentage or \"infinity\")";
          }
        );
        default = null;
        example = "24G";
        description = "`MemoryMax=` of the resident.";
      };
      environment = mkOption {
        type = types.attrsOf (oneLine types.str);
        default = { };
        example = { OMP_NUM_THREADS = "8"; };
        description = "Extra environment for the resident.";
      };
      extraArgs = mkOption {
        type = types.listOf (oneLine types.str);
        default = [ ];
        description = "Extra arguments to `zoo-agent resident`.";
      };
      gpu = mkOption {
        type = types.enum [ "none" "nvidia" "rocm" ];
        default = "none";
        description = "Let the resident reach this GPU's device nodes (and, for ROCm, the render and video groups).";
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the resident's TCP port.";
    };

    verify.interval = mkOption {
      type = types.nullOr (unquoted types.str);
      default = "weekly";
      description = "`OnCalendar=` for re-hashing the zoo against its manifests; `null` disables the timer.";
    };

    gc.enable = mkEnableOption "removal of versions past each host's retention after every apply";

    hfCache = {
      enable = mkEnableOption ''
        an HF-cache view of the zoo: after every apply (and gc), `zoo-agent export hf-cache`
        lays out `hfCache.directory` as a Hugging Face hub cache of links into the zoo's verified
        `current` versions of hub-sourced models, so `HF_HUB_CACHE` pointing there lets
        transformers, sentence-transformers and diffusers load them offline by repository id.
        Readers need the zoo's group, as for the zoo itself'';
      directory = mkOption {
        type = statePath;
        default = "/var/lib/model-zoo-hf-cache";
        example = "/srv/hf-cache";
        description = ''
          Where the view is laid out (created by systemd-tmpfiles, mode 0750, owned by the zoo's
          user and group). Neither inside the zoo nor holding it: the view only links into the
          zoo, and the reconcile unit may write here.
        '';
      };
    };

    prometheus = {
      enable = mkEnableOption ''
        Prometheus metrics: a scrape job for the resident's /metrics in
        `services.prometheus.scrapeConfigs`, and textfile-collector metrics of the reconcile
        and verify units in `prometheus.textfileDir`, read by `services.prometheus.exporters.node`
        when it is enabled. Alert rules and a Grafana dashboard: `examples/prometheus`, `examples/grafana`'';
      textfileDir = mkOption {
        # node_exporter's module writes its flags unescaped into ExecStart: a plain path only.
        type = types.nullOr (types.strMatching "/[A-Za-z0-9._/+-]*" // {
          description = "absolute path of letters, digits and '._/+-'";
        });
        default = "/var/lib/model-zoo-metrics";
        description = "Where `zoo-agent apply`, `verify` and `gc` write their `*.prom` files (null: nowhere).";
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.indexFile == null) != (cfg.settings == null);
        message = "Set exactly one of services.model-zoo.indexFile and services.model-zoo.settings.";
      }
      {
        assertion = lib.all (n: builtins.match envName n != null) (lib.attrNames cfg.resident.environment);
        message = "services.model-zoo.resident.environment: ${
          lib.concatMapStringsSep ", " builtins.toJSON (lib.filter (n: builtins.match envName n == null) (lib.attrNames cfg.resident.environment))
        } is not an environment variable name (letters, digits and '_', not first a digit).";
      }
      {
        assertion = !(cfg.prometheus.enable && cfg.resident.enable) || listenPort != null;
        message = "services.model-zoo.prometheus.enable needs services.model-zoo.resident.listen to be address:port: Prometheus cannot scrape a unix socket.";
      }
      {
        assertion = hfCacheDir == null || !(inside hfCacheDir cfg.stateDir || inside cfg.stateDir hfCacheDir);
        message = "services.model-zoo.hfCache.directory (${toString cfg.hfCache.directory}) and services.model-zoo.stateDir (${cfg.stateDir}) overlap: the view lives outside the zoo and only links into it.";
      }
      {
        assertion = lib.all (name: builtins.match "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}" name != null
          && !(builtins.elem name [ "api-key" "fleet-key" "priority-key" "hf-token" ])) (lib.attrNames cfg.resident.credentials);
        message = "services.model-zoo.resident.credentials: a name is letters, digits, '.', '_' and '-' (at most 64, a letter or digit first), and not one of the resident's own (api-key, fleet-key, priority-key, hf-token).";
      }
      {
        assertion = !cfg.openFirewall || listenPort != null;
        message = "services.model-zoo.openFirewall needs services.model-zoo.resident.listen to be address:port, not a unix socket.";
      }
    ];

    warnings = optional (
      cfg.resident.enable && cfg.resident.apiKeyFile == null && !(lib.hasPrefix "127." cfg.resident.listen || lib.hasPrefix "unix:" cfg.resident.listen || lib.hasPrefix "[::1]" cfg.resident.listen)
    ) "services.model-zoo.resident.listen is not loopback and services.model-zoo.resident.apiKeyFile is unset: anyone who can reach it can use the model.";

    users.users = optionalAttrs (cfg.user == "model-zoo") {
      model-zoo = {
        isSystemUser = true;
        group = cfg.group;
        home = cfg.stateDir;
        description = "model zoo";
      };
    };
    users.groups = optionalAttrs (cfg.group == "model-zoo") { model-zoo = { }; };

    systemd.tmpfiles.settings.model-zoo = mkIf (dirOf cfg.stateDir != "/var/lib") {
      ${cfg.stateDir}.d = {
        mode = "0750";
        inherit (cfg) user group;
      };
    };

    systemd.services.model-zoo-reconcile = {
      description = "model zoo: fetch, verify and publish this host's models";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ] ++ ollamaUnits;
      after = [ "network-online.target" ] ++ ollamaUnits;
      environment = environment // lib.mapAttrs (_: escapeSpecifiers) textfileEnv;
      # A changed index re-runs apply on switch.
      restartTriggers = [ index ];
      # A network failure at boot is retried, boundedly, instead of leaving the zoo empty
      # until the next switch.
      startLimitIntervalSec = 600;
      startLimitBurst = 5;
      serviceConfig = oneshot // noDevices // {
        Type = "oneshot";
        RemainAfterExit = true;
        # A long download must never time out, and it is the only job of this unit, so the
        # server's start is not held hostage by it (nixpkgs #334903).
        TimeoutStartSec = "infinity";
        # Lets `zoo-agent apply` report its progress as the unit's Status: line.
        NotifyAccess = "main";
        ExecStart = execLine zooAgent [ "apply" ];
        Restart = "on-failure";
        RestartSec = 30;
        ExecStartPost = optionals cfg.gc.enable [ (execLine zooAgent [ "gc" ]) ]
          ++ optionals (hfCacheDir != null) [ (execLine zooAgent [ "export" "hf-cache" hfCacheDir ]) ];
        # Only this unit fetches, so only it gets the token.
        LoadCredential = hfCredential;
      } // optionalAttrs (hfCacheDir != null) {
        ReadWritePaths = (oneshot.ReadWritePaths or [ ]) ++ [ (quoted "-${hfCacheDir}") ];
      };
    };

    systemd.services.model-zoo-resident = mkIf cfg.resident.enable {
      description = "model zoo: resident inference server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" "model-zoo-reconcile.service" ] ++ ollamaUnits;
      after = [ "network-online.target" "model-zoo-reconcile.service" ] ++ ollamaUnits;
      environment = environment // lib.mapAttrs (_: escapeSpecifiers) ({ ZOO_LISTEN = cfg.resident.listen; } // cfg.resident.environment);
      # A changed index swaps versions in place (ExecReload) instead of restarting.
      reloadTriggers = [ index ];
      # Bounded backoff: five failed starts in five minutes and the unit stays failed, with
      # the resident's own Status: line saying why.
      startLimitIntervalSec = 300;
      startLimitBurst = 5;
      serviceConfig = common // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = execLine zooAgent ([ "resident" ] ++ cfg.resident.extraArgs)
          + lib.optionalString (cfg.resident.apiKeyFile != null) " --api-key-file %d/api-key"
          + lib.optionalString (cfg.resident.fleetKeyFile != null) " --fleet-key-file %d/fleet-key"
          + lib.optionalString (cfg.resident.priorityKeyFile != null) " --priority-key-file %d/priority-key";
        # Synchronous: returns when the new version serves (systemd 252 has no notify-reload).
        ExecReload = execLine zooAgent [ "resident" "reload" "--pid" ] + " $MAINPID";
        Restart = "on-failure";
        RestartSec = 5;
        # Short: loading a large model extends it with EXTEND_TIMEOUT_USEC as it goes.
        TimeoutStartSec = 90;
        TimeoutStopSec = 60;
        WatchdogSec = mkIf (cfg.resident.watchdogSec > 0) cfg.resident.watchdogSec;
        RuntimeDirectory = "model-zoo";
        RuntimeDirectoryMode = "0750";
        MemoryMax = mkIf (cfg.resident.memoryMax != null) cfg.resident.memoryMax;
        # One cgroup per worker, with a memory limit (issue #34): the unit's cgroup is the
        # resident's to divide, writable though ProtectControlGroups= keeps the rest read-only.
        Delegate = "memory";
        ReadWritePaths = (stateDirectory.ReadWritePaths or [ ]) ++ [ "-/sys/fs/cgroup/system.slice/model-zoo-resident.service" ];
        # hf-token too: a tenant with fetch "on-demand" is fetched by its first request, from here.
        LoadCredential = optional (cfg.resident.apiKeyFile != null) (credential "api-key" cfg.resident.apiKeyFile)
          ++ optional (cfg.resident.fleetKeyFile != null) (credential "fleet-key" cfg.resident.fleetKeyFile)
          ++ optional (cfg.resident.priorityKeyFile != null) (credential "priority-key" cfg.resident.priorityKeyFile) ++ hfCredential
          ++ lib.mapAttrsToList credential cfg.resident.credentials;
        PrivateDevices = cfg.resident.gpu == "none";
        PrivateUsers = cfg.resident.gpu == "none";
        DeviceAllow = map (d: "${d} rw") gpuDevices.${cfg.resident.gpu};
        SupplementaryGroups = optionals (cfg.resident.gpu == "rocm") [ "render" "video" ];
      };
    };

    systemd.services.model-zoo-verify = mkIf (cfg.verify.interval != null) {
      description = "model zoo: re-hash every published file against its manifest";
      after = [ "model-zoo-reconcile.service" ];
      environment = environment // lib.mapAttrs (_: escapeSpecifiers) textfileEnv;
      serviceConfig = oneshot // noDevices // {
        Type = "oneshot";
        ExecStart = execLine zooAgent [ "verify" ];
        # Re-hashing a zoo is bulk I/O; let serving win.
        Nice = 10;
        IOSchedulingClass = "idle";
      };
    };

    systemd.timers.model-zoo-verify = mkIf (cfg.verify.interval != null) {
      description = "model zoo: periodic verification";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = escapeSpecifiers cfg.verify.interval;
        Persistent = true;
        RandomizedDelaySec = "1h";
      };
    };

    networking.firewall.allowedTCPPorts = mkIf (cfg.openFirewall && listenPort != null) [ listenPort ];

    systemd.tmpfiles.settings.model-zoo-hf-cache = mkIf (hfCacheDir != null) {
      ${hfCacheDir}.d = {
        mode = "0750";
        inherit (cfg) user group;
      };
    };

    systemd.tmpfiles.settings.model-zoo-metrics = mkIf (textfileDir != null) {
      # Readable by node_exporter, which runs as its own user; the files hold no secret.
      ${textfileDir}.d = {
        mode = "0755";
        inherit (cfg) user group;
      };
    };

    services.prometheus.scrapeConfigs = mkIf (cfg.prometheus.enable && cfg.resident.enable && listenPort != null) [
      {
        job_name = "model-zoo-resident";
        static_configs = [ { targets = [ scrapeTarget ]; } ];
      }
    ];

    services.prometheus.exporters.node.extraFlags = mkIf (textfileDir != null && nodeExporter) [
      "--collector.textfile.directory=${textfileDir}"
    ];
  };

  meta.maintainers = [ ];
}
