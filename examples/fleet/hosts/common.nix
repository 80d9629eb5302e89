# What every host of the fleet shares: the index, the hub mirror, the keys, the listener.
# Hosts never coordinate state: each one's zoo-agent reconciles hosts.<networking.hostName>
# of the same index.json, on its own.
{
  services.model-zoo = {
    enable = true;
    # One index for the fleet. A change to it is a commit here and a redeploy; each
    # host's reconcile unit re-runs and its resident reloads (no restart).
    indexFile = ../index.json;

    # The site's hub mirror (an olah or other hub-compatible cache on the LAN): every
    # host fetches its slice from it, so huggingface.co sees each file once per site.
    huggingFace.endpoint = "http://mirror.lan:8080";

    # The port of hosts.<id>.endpoint in index.json (http://<host>.lan:8000).
    resident.listen = "0.0.0.0:8000";
    openFirewall = true;

    # Secrets stay out of the Nix store: these are paths that agenix or sops-nix decrypt
    # at activation (e.g. age.secrets.model-zoo-fleet-key.file = ./secrets/fleet-key.age,
    # or sops.secrets."model-zoo/fleet-key"). Both reach the resident by LoadCredential=.
    # Clients' key, per host:
    resident.apiKeyFile = "/run/agenix/model-zoo-api-key";
    # The fleet key, the same file on every host: peers send it to each other, and
    # `zoo-agent fleet status --key-file` sends it; a client's key is never forwarded.
    resident.fleetKeyFile = "/run/agenix/model-zoo-fleet-key";

    # Drop versions past retention (two per artifact: current and previous, for rollback).
    gc.enable = true;
  };

  system.stateVersion = "25.05";
}
