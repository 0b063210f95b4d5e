"""Boot the edgeos arm64 A/B image in QEMU and put it through its paces (images/test-boot.sh).

Host side (real parts, the same ones tests/e2e uses): ``edgeos sim --no-opcua`` (Modbus TCP), a
Mosquitto broker with TLS + ACLs trusting the receiver's CA, ``edgeos-receiver run`` on SQLite,
and the device's credentials from ``edgeos-receiver device add``. Guest side: the image, in
``qemu-system-aarch64 -M virt`` (TCG, 2 vCPUs, AAVMF), on a copy of the disk.

The guest reaches the host through QEMU user networking: the simulator at 10.0.2.2:<port>, the
broker at 10.0.2.100:8883 (a ``guestfwd`` to the broker's free port on the host, so that a
release can be cut off from the broker alone), the bundles over HTTP at 10.0.2.2:<port>.
The test drives the guest through a root shell on a virtio console, which the image starts only
when the kernel command line asks for it (grubenv EDGEOS_CMDLINE, set in the copy).

Steps (each prints what it sees; the figures are printed as one JSON object at the end):
  1. first boot: provisioning from the boot partition, edgeos READY, samples from the simulated
     line delivered to the receiver;
  2. a signed bundle into the other slot, reboot on trial, committed (mark-good) once healthy;
  3. bad input refused with the slots untouched: unsigned, signed by another CA, wrong
     compatible;
  4. a bundle whose edgeos never gets healthy: rolled back after the attempt limit, no gap in
     the batches the receiver has from the device;
  5. power cut (QEMU killed) while RAUC writes the other slot: the committed slot boots, the
     install is recorded as interrupted, the half-written slot stays unbootable;
  6. power cut during the new root's trial boot: the next attempt boots it again and commits;
  7. a full data partition while the broker is down: batches refused and announced (not lost),
     a reboot keeps the slot and edgeos starts on the full disk, and once space is freed and
     the broker is back the backlog drains with no unannounced gap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEVICE = "qemu-gw-01"
BROKER_GUEST_IP = "10.0.2.100"
AAVMF = Path("/usr/share/AAVMF")
figures: dict[str, Any] = {}


def log(msg: str) -> None:
    print(f"[test-boot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


# --------------------------------------------------------------------------- the disk copy


def esp_offset(disk: Path) -> int:
    table = json.loads(subprocess.check_output(["sfdisk", "-J", str(disk)]))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for part in table["partitions"]:
        if part.get("name") == "esp":
            return int(part["start"]) * sector
    raise Failed(f"{disk} has no partition named esp")


def grubenv_bytes(values: dict[str, str]) -> bytes:
    body = "# GRUB Environment Block\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    raw = body.encode()
    if len(raw) > 1024:
        raise Failed("grubenv overflow")
    return raw + b"#" * (1024 - len(raw))


def parse_grubenv(raw: bytes) -> dict[str, str]:
    out = {}
    for line in raw.decode(errors="replace").splitlines():
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def prepare_disk(image: Path, work: Path, credentials: Path, config: Path) -> Path:
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    img = f"{disk}@@{esp_offset(disk)}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mmd", "-i", img, "::/edgeos"], check=True, env=env)
    subprocess.run(
        ["mcopy", "-i", img, str(credentials), "::/edgeos/credentials.json"], check=True, env=env
    )
    subprocess.run(["mcopy", "-i", img, str(config), "::/edgeos/edgeos.toml"], check=True, env=env)
    local = work / "grubenv"
    subprocess.run(
        ["mcopy", "-o", "-i", img, "::/EFI/edgeos/grubenv", str(local)], check=True, env=env
    )
    values = parse_grubenv(local.read_bytes())
    values["EDGEOS_CMDLINE"] = "edgeos.test_shell=1"
    local.write_bytes(grubenv_bytes(values))
    subprocess.run(
        ["mcopy", "-o", "-i", img, str(local), "::/EFI/edgeos/grubenv"], check=True, env=env
    )
    return disk


# --------------------------------------------------------------------------- the VM


class Vm:
    """qemu-system-aarch64 with the serial console read line by line into a log and a list."""

    def __init__(self, disk: Path, work: Path, broker_port: int, smp: int, mem: int) -> None:
        self.work = work
        self.disk = disk
        self.broker_port = broker_port
        self.smp = smp
        self.mem = mem
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        vars_fd = work / "AAVMF_VARS.fd"
        shutil.copyfile(AAVMF / "AAVMF_VARS.fd", vars_fd)
        self.shell_sock = work / "shell.sock"
        fwd = f"guestfwd=tcp:{BROKER_GUEST_IP}:8883-cmd:socat STDIO TCP:127.0.0.1:{broker_port}"
        self.argv = [
            "qemu-system-aarch64",
            "-M",
            "virt",
            "-cpu",
            "cortex-a72",
            "-smp",
            str(smp),
            "-m",
            str(mem),
            "-accel",
            "tcg,thread=multi",
            "-drive",
            f"if=pflash,format=raw,readonly=on,file={AAVMF / 'AAVMF_CODE.fd'}",
            "-drive",
            f"if=pflash,format=raw,file={vars_fd}",
            "-drive",
            f"if=none,id=hd0,format=raw,file={disk}",
            "-device",
            "virtio-blk-pci,drive=hd0",
            "-netdev",
            f"user,id=n0,{fwd}",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=sh,path={self.shell_sock},server=on,wait=off",
            "-device",
            "virtconsole,chardev=sh",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.console = open(self.work / "console.log", "ab")  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            self.console.write(chunk)
            self.console.flush()
            buf += chunk
            *done, buf = buf.split(b"\n")
            with self._cond:
                for raw in done:
                    self.lines.append((time.monotonic(), raw.decode(errors="replace").strip("\r")))
                self._cond.notify_all()
        with self._cond:
            self.lines.append((time.monotonic(), "<qemu exited>"))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_line(
        self, pattern: str, *, since: int, timeout: float
    ) -> tuple[float, re.Match[str], int]:
        """The first console line from index ``since`` on matching ``pattern``: its time, the
        match and the index after it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = since
        with self._cond:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    i += 1
                    if m := rx.search(line):
                        return t, m, i
                    if line == "<qemu exited>":
                        raise Failed(f"QEMU exited while waiting for {pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failed(f"no console line matching {pattern!r} within {timeout:.0f} s")
                self._cond.wait(left)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def power_cycle(self) -> Vm:
        """Cut the power (SIGKILL to QEMU: no shutdown, no flush in the guest) and start the
        same disk again; the console of the new run is read from line 0."""
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            self.shell_sock.unlink()
        fresh = Vm(self.disk, self.work, self.broker_port, self.smp, self.mem)
        fresh.start()
        return fresh


class Shell:
    """The guest's root shell on the virtio console: run a command, get (rc, output)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.n = 0
        self.buf = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(self.path))
        return self.sock

    def run(self, cmd: str, timeout: float = 120.0) -> tuple[int, str]:
        sock = self._connect()
        self.n += 1
        tag = f"__EDGEOS_RC_{self.n}_"
        # The console echoes the typed line, wrapped at the terminal's width (a long command's
        # first part has no tag to recognise it by): the output starts after a marker line that
        # the echo cannot contain (its two halves are joined only by the shell).
        begin = f"__EDGEOS_OUT_{self.n}__"
        half = len(begin) // 2
        sock.sendall(
            f"printf '%s\\n' '{begin[:half]}''{begin[half:]}'; {cmd}; echo {tag}$?__\n".encode()
        )
        rx = re.compile(re.escape(tag).encode() + rb"(\d+)__")
        deadline = time.monotonic() + timeout
        while not (m := rx.search(self.buf)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"guest command timed out: {cmd}")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise Failed("guest shell closed")
            self.buf += chunk
        out, self.buf = self.buf[: m.start()], self.buf[m.end() :]
        text = out.decode(errors="replace").replace("\r", "")
        lines = text.split("\n")
        # (the marker line may start with the terminal's escape sequences)
        marks = [i for i, ln in enumerate(lines) if ln.endswith(begin)]
        if marks:
            lines = lines[marks[-1] + 1 :]
        # drop what is left of the echo of the command line itself
        lines = [ln for ln in lines if tag not in ln]
        return int(m.group(1)), "\n".join(lines).strip()

    def send_only(self, cmd: str) -> None:
        """Type a command and do not wait (``systemctl reboot``: the shell goes away)."""
        self._connect().sendall(f"{cmd}\n".encode())
        self.buf = b""

    def ready(self, timeout: float) -> None:
        """Wait for the shell after a (re)boot: answer to a no-op."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.buf = b""
                rc, _ = self.run("true", timeout=10)
                if rc == 0:
                    return
            except (OSError, Failed):
                pass
            if time.monotonic() > deadline:
                raise Failed("guest shell did not answer")
            time.sleep(2)

    def check(self, cmd: str, timeout: float = 120.0) -> str:
        rc, out = self.run(cmd, timeout)
        if rc != 0:
            raise Failed(f"guest: `{cmd}` exited {rc}: {out[-800:]}")
        return out


# --------------------------------------------------------------------------- host peers


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_dir(directory: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def ledger(storage_url: str) -> tuple[int, list[str], int]:
    """Batches the receiver holds from the device, the gaps in their sequence numbers that no
    batch announced (lost), and how many sequence numbers were announced as gaps (batches the
    runtime refused, e.g. on a full disk: never accepted, so not lost)."""
    from edgeos_testing.receiverdb import read_receiver

    data = read_receiver(storage_url, DEVICE)
    by_epoch: dict[int, list[int]] = {}
    announced: set[tuple[int, int]] = set()
    for b in data.batches:
        by_epoch.setdefault(b.epoch, []).append(b.seq)
        for epoch, first, last in b.skip:
            announced.update((epoch, q) for q in range(first, last + 1))
    gaps = []
    n_announced = 0
    for epoch, seqs in by_epoch.items():
        seqs.sort()
        missing = set(range(seqs[0], seqs[-1] + 1)) - set(seqs)
        told = {q for q in missing if (epoch, q) in announced}
        n_announced += len(told)
        lost = sorted(missing - told)
        if lost:
            gaps.append(f"epoch {epoch}: missing {lost[:10]}")
    return len(data.batches), gaps, n_announced


def untold_seqs(storage_url: str, epoch: int, last_seq: int) -> list[int]:
    """Sequence numbers 1..last_seq of ``epoch`` the receiver neither holds nor was told of."""
    from edgeos_testing.receiverdb import read_receiver

    data = read_receiver(storage_url, DEVICE)
    known = {b.seq for b in data.batches if b.epoch == epoch}
    for b in data.batches:
        for e, first, last in b.skip:
            if e == epoch:
                known.update(range(first, last + 1))
    return sorted(set(range(1, last_seq + 1)) - known)


def make_bundles(out: Path, work: Path) -> dict[str, Path]:
    mk = HERE / "make-bundle.sh"
    b: dict[str, Path] = {}

    def run(name: str, *args: str) -> None:
        t0 = time.monotonic()
        path = out / f"{name}.raucb"
        subprocess.run(["bash", str(mk), str(path), *args], check=True, stdout=subprocess.DEVNULL)
        b[name] = path
        log(f"bundle {name}: {path.stat().st_size >> 20} MiB in {time.monotonic() - t0:.0f} s")

    run("good", "--version", "2.0.0")
    run("unhealthy", "--version", "3.0.0", "--variant", "unhealthy")
    # Bundles that must be refused before anything is written carry a stub root (seconds to
    # build, never bootable: one that got installed would show at once).
    run(
        "wrong-compatible",
        "--version",
        "2.0.1",
        "--variant",
        "stub",
        "--compatible",
        "edgeos-other-board",
    )
    # signed by a CA the image does not trust
    other = work / "other-ca"
    other.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            str(other / "key.pem"),
            "-out",
            str(other / "cert.pem"),
            "-subj",
            "/O=someone else/CN=not the edgeos signer",
        ],
        check=True,
        capture_output=True,
    )
    run(
        "other-signer",
        "--version",
        "2.0.2",
        "--variant",
        "stub",
        "--cert",
        str(other / "cert.pem"),
        "--key",
        str(other / "key.pem"),
    )
    # unsigned: the good bundle with its signature (CMS at the end, its size in the last 8
    # bytes) overwritten
    unsigned = out / "unsigned.raucb"
    shutil.copyfile(b["good"], unsigned)
    with open(unsigned, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        sig_size = int.from_bytes(f.read(8), "big")
        f.seek(-8 - sig_size, os.SEEK_END)
        f.write(b"\0" * sig_size)
    b["unsigned"] = unsigned
    return b


# --------------------------------------------------------------------------- the scenario

STATUS = (
    "/usr/lib/edgeos/python/bin/python -m edgeos status --config /etc/edgeos/edgeos.toml --json"
)


async def guest_status(shell: Shell) -> dict[str, Any]:
    """``edgeos status --json`` in the guest ({} when it does not answer)."""
    rc, out = await asyncio.to_thread(shell.run, STATUS, 60)
    if rc != 0 or "{" not in out:
        return {}
    try:
        doc = json.loads(out[out.index("{") :])
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _find(doc: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a nested status document."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for value in doc.values():
            if (found := _find(value, key)) is not None:
                return found
    return None


async def drained(shell: Shell, storage: str, what: str) -> tuple[int, list[str], int]:
    """Wait until the device's spool is empty and the receiver has no unannounced gap."""
    t0 = time.monotonic()
    while True:
        status = await guest_status(shell)
        n, gaps, announced = await asyncio.to_thread(ledger, storage)
        backlog = _find(status, "backlog_batches")
        if gaps == [] and backlog == 0:
            return n, gaps, announced
        if time.monotonic() - t0 > 300:
            raise Failed(f"{what}: lost {gaps}, backlog {backlog}, status {str(status)[-600:]}")
        await asyncio.sleep(5)


async def grubenv_of(shell: Shell) -> dict[str, str]:
    out = await asyncio.to_thread(shell.check, "grub-editenv /boot/efi/EFI/edgeos/grubenv list")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def last_outcome(shell: Shell) -> dict[str, Any]:
    """The image's record of the last root update (mark-good.py's last-outcome.json)."""
    raw = await asyncio.to_thread(shell.check, "cat /var/lib/edgeos/rauc/last-outcome.json")
    doc = json.loads(raw)
    return doc if isinstance(doc, dict) else {}


async def rauc_until_mark_good(
    vm: Vm, since: int, args: argparse.Namespace
) -> list[tuple[float, re.Match[str]]]:
    """Every ``EDGEOS-RAUC`` console line (time, match) from ``since`` up to the first
    ``mark-good`` (the last item): trials that failed, rollbacks, watches on the way."""
    seen = []
    while True:
        t, m, since = await asyncio.to_thread(
            vm.wait_line,
            r"EDGEOS-RAUC (watching|trial-failed|rolled-back|mark-good|install-interrupted).*",
            since=since,
            timeout=args.boot_timeout + 3 * args.health_window + 120,
        )
        log(m.group(0))
        seen.append((t, m))
        if m.group(1) == "mark-good":
            return seen


async def rauc_booted(shell: Shell) -> str:
    raw = await asyncio.to_thread(shell.check, "rauc status --output-format=json 2>/dev/null")
    return str(json.loads(raw[raw.index("{") :]).get("booted"))


async def scenario(args: argparse.Namespace) -> None:
    from edgeos_cloud.receiver.pki import CertificateAuthority
    from edgeos_testing.mosquitto import MosquittoBroker
    from edgeos_testing.procs import ReceiverProcess, SimProcess
    from edgeos_testing.rig import Credentials
    from edgeos_testing.rigspec import PeersSpec

    image = Path(args.image)
    work = Path(tempfile.mkdtemp(prefix="edgeos-boot-", dir="/var/tmp"))
    log(f"work dir {work}")
    stack = contextlib.ExitStack()
    vm: Vm | None = None
    try:
        bundles_dir = work / "bundles"
        bundles_dir.mkdir()
        bundles: dict[str, Path] = {}
        if "update" in args.steps or "bad" in args.steps or "rollback" in args.steps:
            bundles = await asyncio.to_thread(make_bundles, bundles_dir, work)

        creds = await asyncio.to_thread(Credentials.provision, work / "pki", DEVICE)
        bundle = work / "pki" / f"{DEVICE}.credentials.json"
        sim = SimProcess(PeersSpec(nests=2, tags_per_nest=20, opcua=False, tick_hz=5.0), work)
        async with asyncio.timeout(60):
            await sim.start()
        stack.callback(sim.kill)
        ca = CertificateAuthority(creds.receiver_dir / "registry" / "ca")
        broker = MosquittoBroker(work / "mq", ca=ca)
        # The device reaches the broker as 10.0.2.100 (guestfwd): the certificate must say so.
        broker._server = ca.issue_server(
            ("127.0.0.1", "localhost", BROKER_GUEST_IP), out_dir=work / "mq" / "server-guest"
        )
        broker._write_config()
        await asyncio.to_thread(broker.start)
        stack.callback(broker.kill)
        storage = f"sqlite:///{work / 'receiver.db'}"
        rdir = creds.receiver_dir
        rconf = work / "receiver.toml"
        rconf.write_text(
            "\n".join(
                [
                    'log_level = "INFO"',
                    "[broker]",
                    f'url = "{broker.url}"',
                    "reconnect_s = 0.5",
                    "[broker.tls]",
                    f'ca_file = "{rdir / "registry/ca/ca.crt"}"',
                    f'cert_file = "{rdir / "pki/receiver.crt"}"',
                    f'key_file = "{rdir / "pki/receiver.key"}"',
                    "[storage]",
                    f'url = "{storage}"',
                    "[registry]",
                    f'dir = "{rdir / "registry"}"',
                    "[metrics]",
                    'listen = ""',
                    "",
                ]
            )
        )
        receiver = ReceiverProcess(rconf, work / "receiver.log")
        receiver.start()
        stack.callback(receiver.kill)
        http_srv, http_port = serve_dir(bundles_dir)
        stack.callback(http_srv.shutdown)

        config = work / "plant.toml"
        await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                str(HERE / "make-config.py"),
                str(REPO / "examples/small-line.toml"),
                str(config),
                "--hardware",
                "qemu-arm64",
                "--device-id",
                DEVICE,
                "--modbus",
                f"tcp://10.0.2.2:{sim.modbus_port}",
                "--broker",
                f"mqtts://{BROKER_GUEST_IP}:8883",
                "--health-window",
                str(args.health_window),
                "--uplink-interval",
                "3",
            ],
            check=True,
        )
        # The line has 2 nests x 20 tags; make-config keeps the example's count (4): trim it.
        text = config.read_text().replace("count = 4", "count = 2")
        config.write_text(text)
        disk = await asyncio.to_thread(prepare_disk, image, work, bundle, config)

        # ---- 1. first boot
        vm = Vm(disk, work, broker.port, args.smp, args.mem)
        vm.start()
        log(f"QEMU started: {' '.join(vm.argv[:8])} …; console in {work / 'console.log'}")
        t, m, _ = await asyncio.to_thread(
            vm.wait_line, r"EDGEOS-FIRSTBOOT (\S+)", since=0, timeout=args.boot_timeout
        )
        log(f"first boot provisioning: {m.group(0)}")
        if m.group(1) != "provisioned":
            raise Failed(f"first-boot provisioning failed: {m.string}")
        t, m, _ = await asyncio.to_thread(
            vm.wait_line,
            r"EDGEOS-READY slot=(\w) version=(\S+)",
            since=0,
            timeout=args.boot_timeout,
        )
        figures["first_boot_to_ready_s"] = round(t - vm.started, 1)
        log(f"READY after {figures['first_boot_to_ready_s']} s: {m.group(0)}")
        shell = Shell(vm.shell_sock)
        await asyncio.to_thread(shell.ready, 300)
        out = await asyncio.to_thread(
            shell.check,
            "stat -c '%U:%G %a' /var/lib/edgeos /var/lib/edgeos/credentials "
            "/etc/edgeos/edgeos.toml; ls /boot/efi/edgeos; findmnt -no SOURCE /var/lib/edgeos",
        )
        log(f"ownership / ESP / data mount:\n{out}")
        if "edgeos:edgeos" not in out.splitlines()[0] or "credentials.json" in out:
            raise Failed(f"unexpected ownership or credentials left on the ESP: {out}")
        t0 = time.monotonic()
        while True:
            n, gaps, _ = await asyncio.to_thread(ledger, storage)
            if n >= 3:
                break
            if time.monotonic() - t0 > 300:
                raise Failed(
                    f"receiver has {n} batches from {DEVICE} after 300 s; receiver log:"
                    f"\n{receiver.log_tail()}\nbroker:\n{broker.log_tail()}"
                )
            await asyncio.sleep(3)
        figures["first_batches_after_ready_s"] = round(time.monotonic() - t, 1)
        log(f"receiver has {n} batches from {DEVICE} (gaps: {gaps or 'none'})")
        figures["boot"] = "ok"
        if "update" not in args.steps:
            return

        # ---- 2. signed bundle into the other slot, trial boot, commit
        fetch = (
            '/usr/lib/edgeos/python/bin/python -c "import sys,urllib.request;'
            'urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" '
            f"http://10.0.2.2:{http_port}/{{name}}.raucb /var/lib/edgeos/rauc/{{name}}.raucb"
        )
        await asyncio.to_thread(shell.check, "mkdir -p -m 0700 /var/lib/edgeos/rauc")

        async def download(name: str) -> float:
            t0 = time.monotonic()
            await asyncio.to_thread(shell.check, fetch.format(name=name), 600)
            return time.monotonic() - t0

        figures["bundle_size_mib"] = bundles["good"].stat().st_size >> 20
        figures["bundle_download_s"] = round(await download("good"), 1)
        t0 = time.monotonic()
        out = await asyncio.to_thread(
            shell.check, "rauc install /var/lib/edgeos/rauc/good.raucb 2>&1", 1200
        )
        figures["bundle_install_s"] = round(time.monotonic() - t0, 1)
        log(f"rauc install (good, 2.0.0): {figures['bundle_install_s']} s\n{out[-400:]}")
        env = await asyncio.to_thread(shell.check, "grub-editenv /boot/efi/EFI/edgeos/grubenv list")
        log(f"grubenv after install: {' '.join(env.split())}")
        await asyncio.to_thread(shell.check, "rm /var/lib/edgeos/rauc/good.raucb")
        mark = vm.mark()
        t0 = time.monotonic()
        await asyncio.to_thread(shell.send_only, "systemctl reboot")
        t, m, _ = await asyncio.to_thread(
            vm.wait_line,
            r"EDGEOS-READY slot=(\w) version=(\S+)",
            since=mark,
            timeout=args.boot_timeout,
        )
        figures["update_reboot_to_ready_s"] = round(t - t0, 1)
        if (m.group(1), m.group(2)) != ("B", "2.0.0"):
            raise Failed(f"expected slot B version 2.0.0 after the update, got {m.group(0)}")
        t, m, _ = await asyncio.to_thread(
            vm.wait_line,
            r"EDGEOS-RAUC (mark-good|trial-failed).*",
            since=mark,
            timeout=args.boot_timeout,
        )
        if m.group(1) != "mark-good":
            raise Failed(f"trial of 2.0.0 did not commit: {m.group(0)}")
        figures["update_reboot_to_commit_s"] = round(t - t0, 1)
        log(f"committed: {m.group(0)}")
        await asyncio.to_thread(shell.ready, 300)
        raw = await asyncio.to_thread(shell.check, "rauc status --output-format=json 2>/dev/null")
        status = json.loads(raw[raw.index("{") :])
        log(f"rauc status: booted {status.get('booted')}, primary {status.get('boot_primary')}")
        if status.get("booted") != "B" or status.get("boot_primary") != "rootfs.1":
            raise Failed(f"rauc status after the commit: {raw[-800:]}")
        figures["update"] = "committed"

        # ---- 3. bad input
        if "bad" in args.steps:
            before = await asyncio.to_thread(
                shell.check, "grub-editenv /boot/efi/EFI/edgeos/grubenv list"
            )
            refusals = {}
            for name in ("unsigned", "other-signer", "wrong-compatible"):
                await download(name)
                rc, out = await asyncio.to_thread(
                    shell.run, f"rauc install /var/lib/edgeos/rauc/{name}.raucb 2>&1", 600
                )
                await asyncio.to_thread(shell.check, f"rm -f /var/lib/edgeos/rauc/{name}.raucb")
                if rc == 0:
                    raise Failed(f"the {name} bundle was installed:\n{out}")
                # RAUC's own words (`LastError: …`), not the progress line that failed
                lines = out.splitlines()
                reason = next(
                    (ln for ln in lines if "LastError" in ln),
                    next((ln for ln in lines if "rror" in ln), lines[-1] if lines else ""),
                )
                refusals[name] = reason.strip()[-200:]
                log(f"refused {name}: {refusals[name]}")
            after = await asyncio.to_thread(
                shell.check, "grub-editenv /boot/efi/EFI/edgeos/grubenv list"
            )
            if before != after:
                raise Failed(f"a refused bundle changed grubenv:\n{before}\n->\n{after}")
            figures["refused"] = refusals

        # ---- 4. a release that never gets healthy: rollback after the attempt limit
        if "rollback" in args.steps:
            n_before, _, _ = await asyncio.to_thread(ledger, storage)
            await download("unhealthy")
            await asyncio.to_thread(
                shell.check, "rauc install /var/lib/edgeos/rauc/unhealthy.raucb 2>&1", 1200
            )
            await asyncio.to_thread(shell.check, "rm /var/lib/edgeos/rauc/unhealthy.raucb")
            mark = vm.mark()
            t0 = time.monotonic()
            await asyncio.to_thread(shell.send_only, "systemctl reboot")
            seen = await rauc_until_mark_good(vm, mark, args)
            attempts = sum(1 for _, m in seen if m.group(1) == "trial-failed")
            for t, m in seen:
                if m.group(1) == "rolled-back":
                    figures["rollback_reboot_to_fallback_s"] = round(t - t0, 1)
            t, m = seen[-1]
            if "slot=B" not in m.group(0) or "rollback_reboot_to_fallback_s" not in figures:
                raise Failed(f"expected a rollback to slot B, got {m.group(0)}")
            figures["rollback_to_committed_s"] = round(t - t0, 1)
            figures["rollback_failed_attempts"] = attempts
            await asyncio.to_thread(shell.ready, 300)
            outcome = await last_outcome(shell)
            log(f"outcome: {outcome}")
            if outcome.get("outcome") != "rolled_back":
                raise Failed(f"outcome after the rollback: {outcome}")
            # every batch the runtime accepted while the release could not deliver arrives now
            n_after, gaps, _ = await drained(shell, storage, "after the rollback")
            figures["rollback_batches_delivered"] = n_after - n_before
            figures["rollback_gaps"] = gaps
            figures["rollback"] = "rolled back, no gaps"

        # ---- 5. power cut while RAUC writes the other slot
        if "powercut" in args.steps:
            committed = await rauc_booted(shell)
            other = "A" if committed == "B" else "B"
            await download("good")
            await asyncio.to_thread(
                shell.check,
                "(rauc install /var/lib/edgeos/rauc/good.raucb"
                " > /var/lib/edgeos/rauc/install.log 2>&1 &)",
            )
            t0 = time.monotonic()
            while True:
                _, out = await asyncio.to_thread(
                    shell.run, "cat /var/lib/edgeos/rauc/install.log", 30
                )
                if re.search(r"Copying image to|Updating slot", out):
                    break
                if re.search(r"succeeded|failed|rror", out):
                    raise Failed(f"the install ended before the power could be cut:\n{out}")
                if time.monotonic() - t0 > 900:
                    raise Failed(f"RAUC did not start writing the slot in 900 s:\n{out}")
                await asyncio.sleep(1)
            log(f"power cut during the install ({out.splitlines()[-1].strip()})")
            vm = vm.power_cycle()
            shell = Shell(vm.shell_sock)
            t, m, _ = await asyncio.to_thread(
                vm.wait_line,
                r"EDGEOS-READY slot=(\w) version=(\S+)",
                since=0,
                timeout=args.boot_timeout,
            )
            figures["powercut_install_to_ready_s"] = round(t - vm.started, 1)
            if m.group(1) != committed:
                raise Failed(f"after a power cut during the install: {m.group(0)}")
            _, m, _ = await asyncio.to_thread(
                vm.wait_line,
                r"EDGEOS-RAUC install-interrupted slot=(\w+) booted=(\w)",
                since=0,
                timeout=args.boot_timeout,
            )
            log(m.group(0))
            if m.group(1) != other:
                raise Failed(
                    f"the interrupted install was reported for the wrong slot: {m.group(0)}"
                )
            await asyncio.to_thread(shell.ready, 300)
            genv = await grubenv_of(shell)
            # ORDER may still name the other slot first (a rollback marks it bad, it does not
            # reorder): what counts is the slot grub.cfg picks, the first of ORDER with _OK=1.
            picks = [s for s in genv.get("ORDER", "").split() if genv.get(f"{s}_OK") == "1"]
            if genv.get(f"{other}_OK") != "0" or picks[:1] != [committed]:
                raise Failed(f"grubenv after an interrupted install: {genv}")
            outcome = await last_outcome(shell)
            if outcome.get("outcome") != "install_interrupted":
                raise Failed(f"outcome after an interrupted install: {outcome}")
            await asyncio.to_thread(
                shell.check,
                "rm -f /var/lib/edgeos/rauc/good.raucb /var/lib/edgeos/rauc/install.log",
            )
            _, gaps, _ = await drained(shell, storage, "after the power cut during the install")
            figures["powercut_install"] = f"booted {committed}, {other} left unbootable, recorded"

            # ---- 6. power cut during the new root's first (trial) boot
            await download("good")
            await asyncio.to_thread(
                shell.check, "rauc install /var/lib/edgeos/rauc/good.raucb 2>&1", 1200
            )
            await asyncio.to_thread(shell.check, "rm /var/lib/edgeos/rauc/good.raucb")
            mark = vm.mark()
            await asyncio.to_thread(shell.send_only, "systemctl reboot")
            _, m, _ = await asyncio.to_thread(
                vm.wait_line,
                r"EDGEOS-RAUC watching slot=(\w) trial=1 attempt=(\S+)",
                since=mark,
                timeout=args.boot_timeout,
            )
            if m.group(1) != other:
                raise Failed(f"expected a trial boot of {other}: {m.group(0)}")
            log(f"power cut during the trial boot ({m.group(0)})")
            vm = vm.power_cycle()
            shell = Shell(vm.shell_sock)
            t0 = vm.started
            t, m = (await rauc_until_mark_good(vm, 0, args))[-1]
            if f"slot={other} trial=1" not in m.group(0):
                raise Failed(f"the trial cut by a power loss did not commit {other}: {m.group(0)}")
            figures["powercut_trial_to_commit_s"] = round(t - t0, 1)
            await asyncio.to_thread(shell.ready, 300)
            outcome = await last_outcome(shell)
            if (outcome.get("outcome"), outcome.get("slot")) != ("committed", other):
                raise Failed(f"outcome after the trial cut by a power loss: {outcome}")
            _, gaps, _ = await drained(shell, storage, "after the power cut during the trial")
            figures["powercut_trial"] = f"{other} committed on the next attempt, no gaps"

        # ---- 7. a full data partition
        if "diskfull" in args.steps:
            booted = await rauc_booted(shell)
            n_before, _, announced_before = await asyncio.to_thread(ledger, storage)
            # With the broker reachable the spool lives on the space its acknowledged segments
            # give back (hil_tests: test_restart_on_a_full_disk_…); with the broker down nothing
            # is given back and every batch meets the full disk.
            await asyncio.to_thread(broker.kill)
            # As root: past the 5 % reserve too (edgeos, its own user, meets ENOSPC before).
            out = await asyncio.to_thread(
                shell.check,
                "fallocate -l $(df --output=avail -B1 /var/lib/edgeos | tail -1)"
                " /var/lib/edgeos/filler; dd if=/dev/zero of=/var/lib/edgeos/filler.tail bs=1M"
                " status=none 2>/dev/null; sync; df -h /var/lib/edgeos | tail -1",
                900,
            )
            log(f"data partition filled: {out}")
            t0 = time.monotonic()
            while True:
                status = await guest_status(shell)
                refused = _find(status, "refused_batches") or 0
                if refused > 0:
                    break
                if time.monotonic() - t0 > 300:
                    raise Failed(f"a full data partition was not noticed: {str(status)[-800:]}")
                await asyncio.sleep(3)
            figures["diskfull_refused_batches_seen"] = refused
            figures["diskfull_spool_enospc"] = _find(status, "enospc")
            log(
                f"full data partition: {refused} batch(es) refused,"
                f" dropped {_find(status, 'dropped')}"
            )
            # Reboot with the partition still full: the committed slot boots, edgeos starts.
            # What this run refused is announced only in memory so far (nothing can be stored
            # to carry it): the next run must still tell the receiver (the spool's gaps.bin).
            killed = _find(await guest_status(shell), "batcher") or {}
            mark = vm.mark()
            t0 = time.monotonic()
            await asyncio.to_thread(shell.send_only, "systemctl reboot")
            t, m, _ = await asyncio.to_thread(
                vm.wait_line,
                r"EDGEOS-READY slot=(\w) version=(\S+)",
                since=mark,
                timeout=args.boot_timeout,
            )
            figures["diskfull_reboot_to_ready_s"] = round(t - t0, 1)
            if m.group(1) != booted:
                raise Failed(f"a full data partition changed the booted slot: {m.group(0)}")
            await asyncio.to_thread(shell.ready, 300)
            await asyncio.to_thread(
                shell.check, "rm -f /var/lib/edgeos/filler /var/lib/edgeos/filler.tail; sync"
            )
            await asyncio.to_thread(broker.start)
            n_after, gaps, announced = await drained(
                shell, storage, "after the data partition was freed"
            )
            figures["diskfull_batches_delivered"] = n_after - n_before
            figures["diskfull_announced_gaps"] = announced - announced_before
            untold = await asyncio.to_thread(
                untold_seqs, storage, int(killed.get("epoch", "0"), 16), int(killed.get("seq", 0))
            )
            figures["diskfull_rebooted_run_last_seq"] = killed.get("seq")
            if not killed or untold:
                raise Failed(
                    f"batches of the run rebooted on the full partition neither stored nor"
                    f" announced: {untold} (its status: {killed})"
                )
            figures["diskfull"] = (
                "kept the slot; what was refused before the reboot announced after it; nothing"
                " accepted lost"
            )
    finally:
        if vm is not None:
            vm.stop()
        stack.close()
        figures["work_dir"] = str(work)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="/var/cache/edgeos/image/edgeos-qemu-arm64.img")
    p.add_argument("--steps", default="boot,update,bad,rollback,powercut,diskfull")
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--mem", type=int, default=1536)
    p.add_argument("--boot-timeout", type=float, default=900)
    p.add_argument("--health-window", type=float, default=20)
    args = p.parse_args()
    args.steps = set(args.steps.split(","))
    rc = 0
    try:
        asyncio.run(scenario(args))
    except Failed as exc:
        figures["failed"] = str(exc)
        rc = 1
    print(json.dumps(figures, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
