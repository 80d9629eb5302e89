# thor: the big GPU box. Serves big, code and chat; answers all three for its peers.
{
  # imports = [ ./thor-hardware.nix ];  # nixos-generate-config's hardware-configuration.nix
  networking.hostName = "thor";

  services.model-zoo.resident.gpu = "nvidia";
  hardware.graphics.enable = true;
  hardware.nvidia.open = true;
  services.xserver.videoDrivers = [ "nvidia" ];
}
