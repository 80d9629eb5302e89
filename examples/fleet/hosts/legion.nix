# legion: a workstation with a 24 GB GPU. Serves code and chat, for its peers too.
{
  # imports = [ ./legion-hardware.nix ];  # nixos-generate-config's hardware-configuration.nix
  networking.hostName = "legion";

  services.model-zoo.resident.gpu = "nvidia";
  hardware.graphics.enable = true;
  hardware.nvidia.open = true;
  services.xserver.videoDrivers = [ "nvidia" ];
}
