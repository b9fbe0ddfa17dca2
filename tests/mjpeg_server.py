"""A network camera for tests: serves MJPEG over HTTP (multipart/x-mixed-replace, as IP cameras do) on
127.0.0.1:PORT at about FPS frames per second, each 160x120 frame a colour gradient with its number in it.
``--silent``: accept connections and never answer (a camera that hangs).

    python tests/mjpeg_server.py PORT [--fps 20] [--silent]

Prints "ready" once listening. Run it as its own process: a test kills it mid-stream and starts it again.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np


def frame(i: int) -> np.ndarray:
    """Frame ``i`` (BGR 120x160): a gradient shifted by i, so consecutive frames differ."""
    y, x = np.mgrid[0:120, 0:160]
    return np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, (x + y + 7 * i) % 256], axis=-1).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--silent", action="store_true")
    args = ap.parse_args()
    if args.silent:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(16)
        print("ready", flush=True)
        held = []
        while True:
            conn, _ = sock.accept()
            held.append(conn)  # never read from, never written to

    class Camera(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            i = 0
            try:
                while True:
                    jpg = cv2.imencode(".jpg", frame(i))[1].tobytes()
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n".encode()
                    self.wfile.write(head + jpg + b"\r\n")
                    self.wfile.flush()
                    i += 1
                    time.sleep(1.0 / args.fps)
            except (BrokenPipeError, ConnectionResetError):
                return

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Camera)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()  # until the test kills this process


if __name__ == "__main__":
    main()
