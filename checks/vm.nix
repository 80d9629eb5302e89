# A NixOS VM publishes a tiny model from a local source, serves it, answers a question,
# notices a tampered file, and refuses a rollback it has no version for. Run with `nix flake check` (needs KVM).
{
  pkgs,
  self,
}:
let
  zoo = self.packages.${pkgs.system}.default;
  python = pkgs.python3.withPackages (ps: [ (ps.toPythonModule zoo) ]);
  # A tiny model and an index for host "local" (files from a local source), built offline.
  tiny = pkgs.runCommand "model-zoo-tiny" { } "${python.interpreter} -m zoo_agent.demo.tiny $out";
in
pkgs.testers.runNixOSTest {
  name = "model-zoo";
  nodes.machine = {
    imports = [ self.nixosModules.default ];
    networking.hostName = "local";
    virtualisation.memorySize = 2048;
    services.model-zoo = {
      enable = true;
      indexFile = "${tiny}/index.json";
    };
  };
  testScript = ''
    machine.wait_for_unit("model-zoo-reconcile.service")
    machine.wait_for_unit("model-zoo-resident.service")
    # What the resident really says, its STATUS= line (reports.py status_line; tests/e2e/test_systemd.py
    # asserts the same): "1 tenant: chat tiny@1 (idle 4s); 0 requests".
    machine.succeed("systemctl show -p StatusText --value model-zoo-resident | grep -Eq '^1 tenant: chat tiny@1 [(](idle|[0-9]+ running)[^)]*[)]; [0-9]+ requests'")
    out = machine.succeed(
        "curl -sf http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json'"
        + " -d '{\"model\": \"chat\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 4}'"
    )
    assert "choices" in out, out
    env = "ZOO_ROOT=/var/lib/model-zoo ZOO_HOST=local ZOO_INDEX=${tiny}/index.json"
    machine.succeed(f"{env} zoo-agent verify")
    # Tamper with a published file: verify (the timer's unit) must fail and say which.
    machine.succeed("f=$(find /var/lib/model-zoo/models -name config.json -path '*versions*' | head -1); chmod u+w $f; echo x >> $f")
    machine.fail("systemctl start model-zoo-verify.service")
    machine.succeed("journalctl -u model-zoo-verify | grep -q config.json")
    # Only one version was ever published: a rollback is refused, and the zoo stays as it is.
    machine.fail(f"{env} zoo-agent rollback tiny")
    machine.succeed("test -L /var/lib/model-zoo/models/tiny/current")
  '';
}
