#!/usr/bin/python3
"""qmp.py — the QMP side of bench/qemu-live.sh, in one small client.

  qmp.py cmd TARGET COMMAND [JSON-ARGS]   run one QMP command, print its return
  qmp.py timed TARGET COMMAND [JSON-ARGS] the same, but print how long the
                                          command took (s), not its return
  qmp.py diff DAY1 DAY2 RUNS [PERCENT]    list the 64 KiB blocks that differ
                                          (or a spread share of them, PERCENT %
                                          of the disk)
  qmp.py build DAY1 DAY2 RUNS OUT         write OUT: DAY1 with those blocks of DAY2
  qmp.py check RUNS INC REST FULL         check a live incremental's restore INC:
                                          its changed chunks as in REST (a backup
                                          of the changed image at rest), the rest
                                          as in FULL (the full it was based on)
  qmp.py apply TARGET DEV DAY2 RUNS       write day 2's data at those blocks
  qmp.py probe TARGET DEV OFF FILE        write FILE's first 4 KiB at OFF every
                                          20 ms until SIGTERM; print the slowest
                                          write (s) and the number of writes

TARGET is a QMP socket path, or libvirt:DOMAIN (through libvirt's monitor).
Writes go through HMP `qemu-io -d DEV`, i.e. through the guest device's
block backend, the path a guest write takes (and so through any
copy-before-write filter a backup put above the disk).
"""
import json
import os
import random
import signal
import socket
import sys
import time

BLOCK = 64 * 1024
CHUNK = 256 * 1024
MAX_RUN = 1024 * 1024


class QMP:
    def __init__(self, path, timeout=60):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise SystemExit(f"{path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise SystemExit("QMP socket closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, args=None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise SystemExit(f"QMP {cmd}: {reply['error'].get('desc')}")


class Libvirt:
    def __init__(self, name):
        import libvirt
        import libvirt_qemu
        self.qemu = libvirt_qemu
        self.dom = libvirt.open("qemu:///system").lookupByName(name)

    def execute(self, cmd, args=None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        reply = json.loads(self.qemu.qemuMonitorCommand(self.dom, json.dumps(msg), 0))
        if "error" in reply:
            raise SystemExit(f"QMP {cmd}: {reply['error'].get('desc')}")
        return reply["return"]


def connect(target):
    if target.startswith("libvirt:"):
        return Libvirt(target[len("libvirt:"):])
    return QMP(target)


def qemu_io(mon, dev, command):
    out = mon.execute("human-monitor-command",
                      {"command-line": f'qemu-io -d {dev} "{command}"'})
    if "error" in out.lower() or "failed" in out.lower():
        raise SystemExit(f"qemu-io {command}: {out.strip()}")


def diff(day1, day2, runs_path, percent="all"):
    runs = []
    with open(day1, "rb") as a, open(day2, "rb") as b:
        base = 0
        while True:
            xs, ys = a.read(64 * BLOCK), b.read(64 * BLOCK)
            if not xs and not ys:
                break
            if xs == ys:
                base += len(ys)
                continue
            x, y = memoryview(xs), memoryview(ys)
            for i in range(0, len(y), BLOCK):
                if x[i:i + BLOCK] == y[i:i + BLOCK]:
                    continue
                off, n = base + i, len(y[i:i + BLOCK])
                if runs and runs[-1][0] + runs[-1][1] == off and runs[-1][1] < MAX_RUN:
                    runs[-1][1] += n
                else:
                    runs.append([off, n])
            base += len(ys)
    if percent != "all":
        runs = pick(runs, float(percent) / 100 * os.path.getsize(day1))
    dirty = sum(n for _, n in runs)
    chunks = set()
    for o, n in runs:
        chunks.update(range(o // CHUNK, (o + n - 1) // CHUNK + 1))
    with open(runs_path, "w") as f:
        json.dump({"runs": runs, "dirty": dirty, "dirty_chunks": len(chunks) * CHUNK,
                   "writes": len(runs)}, f)


def pick(runs, want):
    """About want bytes of runs, spread over the disk as a day's writes
    are: a fixed pseudo-random choice, in disk order."""
    order = list(range(len(runs)))
    random.Random(11).shuffle(order)
    taken, total = [], 0
    for i in order:
        if total >= want:
            break
        taken.append(i)
        total += runs[i][1]
    return [runs[i] for i in sorted(taken)]


def build(day1, day2, runs_path, out):
    """Writes out: day1 with the runs of day2 on it (what the VM's drive
    holds once apply has run)."""
    runs = json.load(open(runs_path))["runs"]
    os.system(f"cp --sparse=always '{day1}' '{out}'")
    with open(day2, "rb") as src, open(out, "r+b") as dst:
        for off, n in runs:
            src.seek(off)
            dst.seek(off)
            dst.write(src.read(n))


def check(runs_path, inc, rest, full):
    """Checks a live incremental's restore (inc) chunk by chunk: a chunk
    the changes touched holds what sauve's backup of the changed image at
    rest restores to (rest: the same bytes through the same block map);
    any other chunk holds what the full backup it was based on restores
    to (full). Prints the chunks that differ; exit 1 if any."""
    runs = json.load(open(runs_path))["runs"]
    dirty = set()
    for o, n in runs:
        dirty.update(range(o // CHUNK, (o + n - 1) // CHUNK + 1))
    bad = []
    with open(inc, "rb") as a, open(rest, "rb") as b, open(full, "rb") as c:
        i = 0
        while True:
            x, y, z = a.read(CHUNK), b.read(CHUNK), c.read(CHUNK)
            if not x and not y and not z:
                break
            want = y if i in dirty else z
            if x != want:
                bad.append(i)
            i += 1
    if bad:
        print(f"{len(bad)} chunks differ, first {bad[:5]} "
              f"({sum(1 for b in bad if b in dirty)} of them dirty)")
        raise SystemExit(1)


def apply(target, dev, day2, runs_path):
    runs = json.load(open(runs_path))["runs"]
    mon = connect(target)
    tmp = runs_path + ".data"
    with open(day2, "rb") as src:
        for off, n in runs:
            src.seek(off)
            with open(tmp, "wb") as f:
                f.write(src.read(n))
            qemu_io(mon, dev, f"write -q -s {tmp} {off} {n}")
    os.unlink(tmp)


def probe(target, dev, off, data):
    mon = connect(target)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    worst, count = 0.0, 0
    while not stop:
        t = time.monotonic()
        qemu_io(mon, dev, f"write -q -s {data} {off} 4k")
        worst = max(worst, time.monotonic() - t)
        count += 1
        time.sleep(0.02)
    print(f"{worst:.3f} {count}")


def main(argv):
    if argv[:1] in (["cmd"], ["timed"]) and len(argv) in (3, 4):
        args = json.loads(argv[3]) if len(argv) == 4 else None
        mon = connect(argv[1])
        t = time.monotonic()
        ret = mon.execute(argv[2], args)
        print(f"{time.monotonic() - t:.3f}" if argv[0] == "timed" else json.dumps(ret))
    elif len(argv) in (4, 5) and argv[0] == "diff":
        diff(*argv[1:])
    elif len(argv) == 5 and argv[0] == "build":
        build(*argv[1:])
    elif len(argv) == 5 and argv[0] == "check":
        check(*argv[1:])
    elif len(argv) == 5 and argv[0] == "apply":
        apply(*argv[1:])
    elif len(argv) == 5 and argv[0] == "probe":
        probe(argv[1], argv[2], int(argv[3]), argv[4])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
