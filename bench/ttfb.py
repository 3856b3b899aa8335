#!/usr/bin/env python3
"""ttfb.py CMD... — run CMD with its stdout read and discarded here, and
print "TTFB WALL CPU RSS_KIB": seconds to the first byte of its stdout
(or -1 if it wrote none), seconds until it exited, user+system CPU
seconds of it and its children, and the largest child's peak RSS.
Exits with CMD's status. Used by bench/fileget.sh."""
import os
import resource
import subprocess
import sys
import time

start = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
first = -1.0
fd = p.stdout.fileno()
while True:
    b = os.read(fd, 1 << 20)
    if not b:
        break
    if first < 0:
        first = time.monotonic() - start
rc = p.wait()
wall = time.monotonic() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{first:.3f} {wall:.3f} {ru.ru_utime + ru.ru_stime:.2f} {ru.ru_maxrss}")
sys.exit(rc)
