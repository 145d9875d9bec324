#!/usr/bin/env python3
"""A stand-in for systemd's NOTIFY_SOCKET: binds a unix datagram socket and
appends every sd_notify message it receives to a file, one datagram per line
group followed by a line "--". Usage: notify_listener.py SOCKET_PATH OUT_FILE
"""
import os
import socket
import sys

path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
with open(out, "a", buffering=1) as f:
    while True:
        data = s.recv(4096)
        f.write(data.decode("utf-8", "replace").rstrip("\n") + "\n--\n")
