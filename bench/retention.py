#!/usr/bin/env python3
"""retention.py — helpers of bench/retention.sh.

  retention.py churn MNT DAY CHURN BENCH_DIR POOL   one day of edits on a mounted file system
  retention.py io OUT CMD...                         run CMD, write its I/O counters to OUT
  retention.py cmpimg RESTORED ORIG FREE_RANGES     compare a restore with the original image

churn applies ../shared/bench/make-disk.sh's day-2 method once, with a
per-day seed: new files (half real files from the host, half seeded
random), in-place partial overwrites, whole-file replacements (write new +
rename), appends, deletions. At CHURN=2 the amounts are make-disk.sh's
(12 + 12 MiB rewritten, 50 MiB new, 20 MiB deleted, 60 appends); other
values scale them. The real files of day N are the Nth slice of the host
files that make-disk.sh did not select (in its sha256-of-path order), so
they are new to the disk every day. Unlike make-disk.sh, edits and
deletions pick from every file of the disk, also those of earlier days.

io: the counters of /proc/self/io (rchar, wchar, read_bytes, write_bytes,
cancelled_write_bytes) before and after; a reaped child's counters are
added to its parent's, so the difference is CMD's and its children's.

cmpimg: every 4 KiB block of RESTORED equals ORIG's, except blocks that
ORIG's ext4 partition has free (FREE_RANGES: "start-end" block ranges of
the partition, from dumpe2fs, and the partition offset), which may read
back as zeros (sauve skips free space by default).
"""
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys

MIB = 1 << 20


def read_list(path):
    try:
        with open(path, "rb") as f:
            return {p.decode() for p in f.read().split(b"\0") if p}
    except FileNotFoundError:
        return set()


def build_pool(bench_dir, pool):
    """Host files that make-disk.sh did not put on the disk, in its order."""
    taken = set()
    for name in ("sel", "old", "new"):
        taken |= read_list(os.path.join(bench_dir, name + ".list"))
    files = []
    for root in ["/usr/local/go", "/usr/share", "/usr/lib"]:
        if not os.path.isdir(root):
            continue
        dev = os.lstat(root).st_dev
        for dp, dns, fns in os.walk(root):
            dns[:] = sorted(d for d in dns if os.lstat(os.path.join(dp, d)).st_dev == dev)
            for fn in sorted(fns):
                p = os.path.join(dp, fn)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20 or b"\n" in p.encode():
                    continue
                if not os.access(p, os.R_OK) or p.lstrip("/") in taken:
                    continue
                files.append((hashlib.sha256(p.encode()).digest(), p, st.st_size))
    files.sort()
    tmp = pool + ".tmp"
    with open(tmp, "w") as f:
        for _, p, sz in files:
            f.write(f"{sz}\t{p}\n")
    os.replace(tmp, pool)


def churn(mnt, day, churn_pct, bench_dir, pool):
    day, k = int(day), float(churn_pct) / 2.0
    r = random.Random(f"sauve-retention-day-{day}")

    def rbytes(n):
        return b"".join(r.randbytes(min(n - i, MIB)) for i in range(0, n, MIB))

    if not os.path.exists(pool):
        build_pool(bench_dir, pool)
    # Files on the disk before today's new ones: today's edits pick from them.
    files = []
    for dp, dns, fns in os.walk(mnt):
        if dp == mnt:
            dns[:] = [d for d in dns if d != "lost+found"]
        dns.sort()
        for fn in sorted(fns):
            p = os.path.join(dp, fn)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                files.append((p, st.st_size))
    total = sum(s for _, s in files)
    stats = {"new": 0, "inplace": 0, "replaced": 0, "appended": 0, "deleted": 0}

    # 0) new files: the day's slice of host files (25 MiB at CHURN=2), and
    #    5 seeded random files (5 MiB each at CHURN=2).
    want = int(25 * MIB * k)
    with open(pool) as f:
        entries = [(int(a), b) for a, b in (line.rstrip("\n").split("\t", 1) for line in f)]
    acc, start = 0, 0
    for i, (sz, _) in enumerate(entries):  # slices of `want` bytes; day 2 takes the first
        if acc >= want * (day - 2):
            start = i
            break
        acc += sz
    else:
        sys.exit(f"host pool exhausted at day {day}")
    dest = os.path.join(mnt, "srv", f"new-day{day:02d}")
    got = 0
    for sz, p in entries[start:]:
        if got >= want:
            break
        q = os.path.join(dest, p.lstrip("/"))
        os.makedirs(os.path.dirname(q), exist_ok=True)
        try:
            shutil.copyfile(p, q)
        except OSError:
            continue
        got += sz
    for i in range(5):
        n = int(5 * MIB * k)
        with open(os.path.join(dest, f"rand-{i}.bin"), "wb") as f:
            f.write(rbytes(n))
        got += n
    stats["new"] = got

    r.shuffle(files)
    it = iter(files)

    def big():
        return next(p for p in it if p[1] >= 64 << 10)

    # 1) in-place partial overwrites (database/VM-image style), 4K..160K runs
    while stats["inplace"] < 12 * MIB * k:
        p, sz = big()
        n = min(sz, r.randrange(1, 41) * 4096)
        off = r.randrange(0, max(1, sz - n + 1)) & ~4095
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(rbytes(n))
        stats["inplace"] += n
    # 2) whole-file replacement via new file + rename (package upgrade style)
    while stats["replaced"] < 12 * MIB * k:
        p, sz = big()
        with open(p, "rb") as f:
            data = bytearray(f.read())
        for _ in range(8):  # a few small edits scattered in the file
            o = r.randrange(0, len(data))
            data[o:o + 64] = rbytes(min(64, len(data) - o))
        tmp = p + ".dpkg-new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        stats["replaced"] += sz
    # 3) appends (log style), 1..8 KiB each
    for _ in range(max(1, round(60 * k))):
        p, sz = next(it)
        n = r.randrange(1, 9) * 1024
        with open(p, "ab") as f:
            f.write((b"%d day%d log line\n" % (r.randrange(1 << 30), day)) * (n // 24))
        stats["appended"] += n
    # 4) deletions
    while stats["deleted"] < 20 * MIB * k:
        p, sz = next(it)
        if sz > 8 * MIB * k:  # keep the amount near make-disk.sh's (no 48 MiB blob at once)
            continue
        os.unlink(p)
        stats["deleted"] += sz
    print(f"day {day} churn (MiB):", {a: round(b / MIB, 1) for a, b in stats.items()},
          f"of {total / MIB:.0f} MiB of files")


def io(out, argv):
    def counters():
        with open("/proc/self/io") as f:
            return {a: int(b) for a, b in (line.split(": ") for line in f)}
    before = counters()
    rc = subprocess.call(argv)
    after = counters()
    with open(out, "w") as f:
        for key in ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes"):
            f.write(f"{key} {after[key] - before[key]}\n")
    sys.exit(rc)


def cmpimg(restored, orig, ranges_file):
    with open(ranges_file) as f:
        offset, bs = (int(x) for x in f.readline().split())
        free = []
        for line in f:
            for part in line.replace(",", " ").split():
                a, _, b = part.partition("-")
                free.append((int(a), int(b or a)))
    free.sort()
    fi = 0

    def is_free(img_block):  # img_block: index of a 4 KiB block of the image
        nonlocal fi
        byte = img_block * 4096 - offset
        if byte < 0:
            return False
        b = byte // bs
        while fi < len(free) and free[fi][1] < b:
            fi += 1
        return fi < len(free) and free[fi][0] <= b <= free[fi][1]

    z = bytes(4096)
    used_diff = free_zeroed = 0
    with open(restored, "rb") as fr, open(orig, "rb") as fo:
        pos = 0
        while True:
            x, y = fr.read(MIB), fo.read(MIB)
            if not x and not y:
                break
            if len(x) != len(y):
                print(f"sizes differ at byte {pos + min(len(x), len(y))}")
                sys.exit(1)
            if x != y:
                for i in range(0, len(x), 4096):
                    a, b = x[i:i + 4096], y[i:i + 4096]
                    if a == b:
                        continue
                    if a == z and is_free((pos + i) // 4096):
                        free_zeroed += 1
                    else:
                        used_diff += 1
            pos += len(x)
    print(f"{pos} bytes compared; {used_diff} used 4 KiB blocks differ; "
          f"{free_zeroed} free blocks read back as zeros")
    sys.exit(1 if used_diff else 0)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "churn":
        churn(*args)
    elif cmd == "io":
        io(args[0], args[1:])
    elif cmd == "cmpimg":
        cmpimg(*args)
    else:
        sys.exit(f"unknown command {cmd}")
