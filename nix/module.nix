# NixOS module: services.pylmserv - models of pylmserv.lock behind one llama-server on
# loopback, run by systemd with the hardening of `pylmserv serve --generate systemd`.
#
#   imports = [ pylmserv.nixosModules.default ];
#   services.pylmserv = { enable = true; models = [ "qwen2_5-0_5b-instruct" "nomic-embed" ];
#                         embedding = [ "nomic-embed" ]; apiKeyFile = "/run/keys/llm"; };
#
# The models are the flake's fixed-output derivations (the lock's hashes; Nix verifies
# them), llama.cpp is the flake's own package for the chosen backend. One model: llama-server
# on it; several: llama-server's router mode, a preset with one section per model, named by
# its lock name (what clients put in "model"). The API key file is read through systemd's
# LoadCredential= into LLAMA_API_KEY (never on the command line, never in the store).
{ self }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.pylmserv;
  inherit (lib) mkEnableOption mkIf mkOption types concatStringsSep optional optionals optionalString;

  lock = self.lib.lock;
  lockModels = builtins.attrNames (lock.models or { });
  # The flake's packages on this system's nixpkgs (its overlay, applied here).
  ours = self.overlays.default pkgs pkgs;
  llamaFor = backend:
    if backend == "cuda" then ours.pylmserv-llama-cpp.override { cudaSupport = true; }
    else if backend == "rocm" then ours.pylmserv-llama-cpp.override { rocmSupport = true; }
    else if backend == "vulkan" then ours.pylmserv-llama-cpp.override { useVulkan = true; }
    else ours.pylmserv-llama-cpp;
  modelFile = name: ours.pylmservModels.${name};

  # What pylmserv sets itself (as [models.NAME.server] in pylmserv.toml refuses them).
  ownedKeys = [ "model" "m" "hf-repo" "hf" "hfr" "hf-file" "hff" "model-url" "mu" "alias" "a" "host" "port"
    "api-key" "api-key-file" "ssl-key-file" "ssl-cert-file" "embedding" "embeddings" "load-on-startup"
    "sleep-idle-seconds" "models-dir" "models-preset" "models-max" "models-autoload" "no-models-autoload" "log-file" ];
  ownedFlags = [ "--host" "--port" "--api-key" "--api-key-file" "-m" "--model" "--models-preset" "--models-dir"
    "--models-max" "--sleep-idle-seconds" ];
  flagOf = arg: builtins.head (lib.splitString "=" arg);

  iniValue = v: if builtins.isBool v then (if v then "true" else "false") else toString v;
  argsOf = name: cfg.modelArgs.${name} or { };
  router = builtins.length cfg.models > 1;
  atStart = name: builtins.elem name cfg.preload;

  preset = pkgs.writeText "pylmserv-models.ini" (concatStringsSep "\n" ([
    "; written by the pylmserv NixOS module: one section per model of pylmserv.lock"
    "version = 1"
    ""
    "[*]"
  ] ++ optional (cfg.idleUnload != null) "sleep-idle-seconds = ${toString cfg.idleUnload}"
    ++ lib.concatMap (name: [ "" "[${name}]" "model = ${modelFile name}" ]
      ++ optional (builtins.elem name cfg.embedding) "embeddings = true"
      ++ optional (atStart name) "load-on-startup = true"
      ++ lib.mapAttrsToList (k: v: "${k} = ${iniValue v}") (argsOf name)) cfg.models) + "\n");

  # One model: its settings as flags (`true` -> --key, `false` -> --no-key).
  flagsOf = name:
    optional (builtins.elem name cfg.embedding) "--embeddings"
    ++ lib.concatLists (lib.mapAttrsToList (k: v:
      if v == true then [ "--${k}" ] else if v == false then [ "--no-${k}" ] else [ "--${k}" (iniValue v) ]) (argsOf name));

  serverArgs =
    (if router then
      [ "--models-preset" "${preset}" ] ++ optionals (cfg.maxLoaded != null) [ "--models-max" (toString cfg.maxLoaded) ]
    else
      [ "-m" "${modelFile (builtins.head cfg.models)}" ] ++ flagsOf (builtins.head cfg.models)
      ++ optionals (cfg.idleUnload != null) [ "--sleep-idle-seconds" (toString cfg.idleUnload) ])
    ++ [ "--host" "127.0.0.1" "--port" (toString cfg.port) ] ++ cfg.extraArgs;

  start = pkgs.writeShellScript "pylmserv-start" ''
    ${optionalString (cfg.apiKeyFile != null) ''
    LLAMA_API_KEY="$(< "$CREDENTIALS_DIRECTORY/api-key")"
    export LLAMA_API_KEY
    ''}exec ${lib.getExe' cfg.package "llama-server"} ${lib.escapeShellArgs serverArgs}
  '';
in
{
  options.services.pylmserv = {
    enable = mkEnableOption "models of pylmserv.lock behind one OpenAI-compatible llama-server on loopback";
    models = mkOption {
      type = types.listOf (types.enum lockModels);
      default = [ ];
      example = [ "qwen2_5-0_5b-instruct" ];
      description = "Models of pylmserv.lock, by name; several are served behind one endpoint (router mode), chosen by the request's \"model\".";
    };
    backend = mkOption {
      type = types.enum [ "cpu" "cuda" "rocm" "vulkan" ];
      default = "cpu";
      description = "Which of the flake's llama.cpp builds to run.";
    };
    package = mkOption {
      type = types.package;
      default = llamaFor cfg.backend;
      defaultText = lib.literalExpression "the flake's llama-cpp for `backend`";
      description = "The llama.cpp package whose bin/llama-server runs.";
    };
    port = mkOption { type = types.port; default = 8080; description = "Port on 127.0.0.1."; };
    apiKeyFile = mkOption {
      type = types.nullOr (types.strMatching "/.+");
      default = null;
      example = "/run/keys/pylmserv-api-key";
      description = "File holding the API key clients must send (a path as a string: never copied to the store). Read by systemd (LoadCredential=).";
    };
    extraArgs = mkOption { type = types.listOf types.str; default = [ ]; description = "More llama-server arguments (with several models: for every model)."; };
    embedding = mkOption { type = types.listOf types.str; default = [ ]; description = "Models served with embeddings (pylmserv.toml's role = \"embedding\")."; };
    modelArgs = mkOption {
      type = types.attrsOf (types.attrsOf (types.oneOf [ types.str types.int types.float types.bool ]));
      default = { };
      example = { qwen2_5-0_5b-instruct = { ctx-size = 4096; flash-attn = "on"; }; };
      description = "Per model, llama-server options by long name without dashes (pylmserv.toml's [models.NAME.server]).";
    };
    maxLoaded = mkOption { type = types.nullOr types.ints.unsigned; default = null; description = "Several models: at most this many loaded (--models-max; 0: no limit)."; };
    idleUnload = mkOption { type = types.nullOr types.ints.positive; default = null; description = "Seconds without requests after which a model's memory is freed (sleep-idle-seconds)."; };
    preload = mkOption { type = types.listOf types.str; default = [ ]; description = "Several models: those loaded at start (load-on-startup)."; };
  };

  config = mkIf cfg.enable {
    assertions = [
      { assertion = cfg.models != [ ]; message = "services.pylmserv.models: name at least one model of pylmserv.lock"; }
      { assertion = cfg.apiKeyFile == null || !(lib.hasPrefix builtins.storeDir cfg.apiKeyFile);
        message = "services.pylmserv.apiKeyFile is in the Nix store, which every user can read: keep the key outside it"; }
    ] ++ map (name: { assertion = builtins.elem name cfg.models; message = "services.pylmserv: ${name} (in embedding, preload or modelArgs) is not one of services.pylmserv.models"; })
      (cfg.embedding ++ cfg.preload ++ builtins.attrNames cfg.modelArgs)
    ++ lib.concatLists (lib.mapAttrsToList (name: args: map (key: {
      assertion = !(builtins.elem key ownedKeys);
      message = "services.pylmserv.modelArgs.${name}.${key} is set by the module itself";
    }) (builtins.attrNames args)) cfg.modelArgs)
    ++ map (arg: { assertion = !(builtins.elem (flagOf arg) ownedFlags);
                   message = "services.pylmserv.extraArgs: ${flagOf arg} is set by the module (loopback bind, key from apiKeyFile, models from the lock)"; })
      cfg.extraArgs
    ++ [ { assertion = cfg.maxLoaded == null || cfg.maxLoaded == 0 || builtins.length cfg.preload <= cfg.maxLoaded;
           message = "services.pylmserv: more models to preload than maxLoaded"; } ];

    systemd.services.pylmserv = {
      description = "pylmserv: ${concatStringsSep ", " cfg.models} on http://127.0.0.1:${toString cfg.port}/v1";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      # The router lists the models of its cache too: an empty one, so only the lock's are served.
      environment.LLAMA_CACHE = "/run/pylmserv";
      serviceConfig = {
        Type = "exec";
        ExecStart = "${start}";
        DynamicUser = true;
        RuntimeDirectory = "pylmserv";
        LoadCredential = optional (cfg.apiKeyFile != null) "api-key:${cfg.apiKeyFile}";
        Restart = "on-failure";
        RestartSec = 5;
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = cfg.backend == "cpu";
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        IPAddressDeny = "any";
        IPAddressAllow = "localhost";
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        UMask = "0077";
      };
    };
  };
}
