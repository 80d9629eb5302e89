# sprout: a small aarch64 board. Serves chat to its own clients; a request it cannot take
# overflows to thor or legion (tenants.chat.overflow = "peers"); it answers no peer.
{
  # imports = [ ./sprout-hardware.nix ];  # nixos-generate-config's hardware-configuration.nix
  networking.hostName = "sprout";

  # 8 GB shared with the OS: keep the resident well inside it.
  services.model-zoo.resident.memoryMax = "6G";
  services.model-zoo.resident.environment.OMP_NUM_THREADS = "4";
}
