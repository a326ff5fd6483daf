#!/usr/bin/env python3
"""Driver for benches/sync.sh (see that script for usage and what is measured).

Runs two local agents per scenario on 127.0.0.1 and measures the time until
the receiving side has everything, the bytes on the link and each side's peak
memory. Tools: ferry always; rsync (daemon on loopback) and Syncthing (two
instances) with --compare. Standard library only.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

# ---------------------------------------------------------------- the corpus

CORPUS_VERSION = 1
SMALL_FILES = 10_000
SMALL_DIRS = 100
SMALL_MIN, SMALL_MAX = 1024, 64 * 1024
LARGE_SIZE = 1 << 30
INSERT_LEN = 100
# Mid-way, off any power-of-two boundary (an aligned insert would flatter
# fixed-block tools such as Syncthing and rsync).
INSERT_AT = LARGE_SIZE // 2 + 12_345
MIB = 1 << 20
IDLE_SECS = 3


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def tree_digest(entries):
    """entries: iterable of (relpath, size, sha256 hex). One sha256 for all."""
    h = hashlib.sha256()
    for rel, size, digest in sorted(entries):
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
    return h.hexdigest()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


SKIP_TOP = {".ferry", ".stfolder", ".stversions"}


def walk_tree(root):
    """(relpath, size) for every regular file under root, without the tools'
    marker directories and temp files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
        for name in filenames:
            if name.startswith(".syncthing.") and name.endswith(".tmp"):
                continue
            p = os.path.join(dirpath, name)
            out.append((os.path.relpath(p, root), os.lstat(p).st_size))
    return out


def verify_tree(root, expect):
    """Checks count, bytes and the whole-tree checksum against the manifest
    entry `expect`; returns None when equal, else what differs."""
    files = walk_tree(root)
    n, total = len(files), sum(s for _, s in files)
    if n != expect["files"] or total != expect["bytes"]:
        return f"{n} files / {total} bytes, expected {expect['files']} / {expect['bytes']}"
    d = tree_digest((rel, size, file_sha256(os.path.join(root, rel))) for rel, size in files)
    if d != expect["digest"]:
        return "checksum differs"
    return None


def make_corpus(work):
    root = os.path.join(work, "corpus")
    manifest_path = os.path.join(root, "manifest.json")
    want = {"version": CORPUS_VERSION, "small_files": SMALL_FILES, "large": LARGE_SIZE,
            "insert_at": INSERT_AT, "insert_len": INSERT_LEN}
    try:
        with open(manifest_path) as f:
            m = json.load(f)
        if all(m.get(k) == v for k, v in want.items()):
            log(f"corpus: reusing {root}")
            return root, m
    except (OSError, ValueError):
        pass
    log(f"corpus: generating under {root} (about 1.4 GB, deterministic)...")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    t = time.time()
    # Small files: seeded sizes (uniform in 1..64 KiB) and seeded random bytes,
    # so no chunk repeats across files and compression gains nothing.
    rng = random.Random(1)
    entries = []
    for i in range(SMALL_FILES):
        size = rng.randint(SMALL_MIN, SMALL_MAX)
        data = rng.randbytes(size)
        rel = os.path.join(f"d{i % SMALL_DIRS:02d}", f"file{i:05d}.bin")
        p = os.path.join(root, "small", rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        entries.append((rel, size, hashlib.sha256(data).hexdigest()))
    small = {"files": len(entries), "bytes": sum(e[1] for e in entries), "digest": tree_digest(entries)}
    # The large file, and the same with INSERT_LEN bytes inserted at INSERT_AT
    # (kept ready so each run swaps it in with one rename).
    rng = random.Random(2)
    os.makedirs(os.path.join(root, "large"))
    os.makedirs(os.path.join(root, "insert"))
    h_old, h_new = hashlib.sha256(), hashlib.sha256()
    extra = random.Random(3).randbytes(INSERT_LEN)
    with open(os.path.join(root, "large", "big.bin"), "wb") as fo, \
            open(os.path.join(root, "insert", "big.bin"), "wb") as fn:
        pos = 0
        while pos < LARGE_SIZE:
            b = rng.randbytes(MIB)
            fo.write(b)
            h_old.update(b)
            if pos <= INSERT_AT < pos + MIB:
                k = INSERT_AT - pos
                parts = [b[:k], extra, b[k:]]
            else:
                parts = [b]
            for p in parts:
                fn.write(p)
                h_new.update(p)
            pos += MIB
    large = {"files": 1, "bytes": LARGE_SIZE, "digest": tree_digest([("big.bin", LARGE_SIZE, h_old.hexdigest())])}
    insert = {"files": 1, "bytes": LARGE_SIZE + INSERT_LEN,
              "digest": tree_digest([("big.bin", LARGE_SIZE + INSERT_LEN, h_new.hexdigest())])}
    m = dict(want, small=small, large_tree=large, insert_tree=insert)
    os.sync()
    with open(manifest_path, "w") as f:
        json.dump(m, f, indent=1)
    log(f"corpus: done in {time.time() - t:.1f} s: {small['files']} small files, "
        f"{small['bytes'] / 1e6:.0f} MB; large file {LARGE_SIZE} bytes")
    return root, m


def copy_tree(src, dst):
    """A hardlinked copy: instant, and safe because the sending side never
    writes into its files and the insert replaces big.bin by a rename."""
    subprocess.run(["cp", "-al", src, dst], check=True)


# ---------------------------------------------------------- process helpers

STARTED = []  # Popen objects this driver started; stopped at exit


def start(cmd, logfile, env=None, **kw):
    f = open(logfile, "ab")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, **kw)
    f.close()
    STARTED.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=20):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} did not stop within {timeout} s of {sig!r}; killing it")
            p.kill()
            p.wait()
    if p in STARTED:
        STARTED.remove(p)


def stop_all():
    for p in list(STARTED):
        try:
            stop(p, timeout=10)
        except Exception:
            pass


def proc_status(pid):
    """VmHWM and VmRSS in bytes, from /proc/PID/status."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid, children=False):
    """utime + stime of PID (its threads included), in seconds; with
    `children`, plus those of its exited and reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        return sum(int(x) for x in fields[11:15 if children else 13]) / CLK
    except (OSError, ValueError):
        return float("nan")


def machine_busy():
    """CPU seconds the whole machine spent busy so far (all cores), from
    /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK


class TreeSampler(threading.Thread):
    """Samples VmHWM of every live process in the trees under some root pids
    (for short-lived forked helpers such as rsync's), every `every` seconds.
    Keeps, per root, the largest sum over its processes of their peak RSS."""

    def __init__(self, roots, every=0.05):
        super().__init__(daemon=True)
        self.roots = dict(roots)  # name -> pid
        self.every = every
        self.peak = {n: 0 for n in self.roots}
        self.per_pid = {}
        self.halt = threading.Event()

    def scan(self):
        children = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                ppid = int(s[s.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
        for name, root in self.roots.items():
            todo, tree = [root], []
            while todo:
                p = todo.pop()
                tree.append(p)
                todo.extend(children.get(p, []))
            for p in tree:
                hwm = proc_status(p).get("VmHWM")
                if hwm:
                    self.per_pid[(name, p)] = max(self.per_pid.get((name, p), 0), hwm)
            total = sum(v for (n, _), v in self.per_pid.items() if n == name)
            self.peak[name] = max(self.peak[name], total)

    def run(self):
        while not self.halt.is_set():
            self.scan()
            self.halt.wait(self.every)

    def finish(self):
        self.scan()
        self.halt.set()
        self.join()
        return self.peak


def children(pid):
    """The pids whose parent is pid."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                if int(st[st.rindex(")") + 2:].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, ValueError):
                pass
    return out


def wait_until(what, fn, timeout, every=0.1, progress=None):
    """Calls fn() until it returns a truthy value; returns it. Logs progress()
    every 15 s."""
    t0 = time.time()
    last = t0
    while True:
        v = fn()
        if v:
            return v
        now = time.time()
        if now - t0 > timeout:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}"
                               + (f" ({progress()})" if progress else ""))
        if progress and now - last > 15:
            log(f"  ... still waiting for {what}: {progress()}")
            last = now
        time.sleep(every)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def swap_in_insert(corpus, run_dir, folder):
    """Replaces folder/big.bin by the corpus' inserted version in one rename
    (a hardlink made beside the folder, on the same filesystem). Returns the
    time of the rename."""
    tmp = os.path.join(run_dir, "big.bin.new")
    os.link(os.path.join(corpus, "insert", "big.bin"), tmp)
    t = time.time()
    os.rename(tmp, os.path.join(folder, "big.bin"))
    return t


# --------------------------------------------------------------------- ferry

class Ferry:
    name = "ferry"

    def __init__(self, binary, run_dir):
        self.bin = binary
        self.dir = run_dir
        self.a_home, self.b_home = f"{run_dir}/A", f"{run_dir}/B"
        self.a_dir, self.b_dir = f"{run_dir}/a-docs", f"{run_dir}/b-docs"
        self.procs = {}

    def cli(self, home, *args, check=True, timeout=60):
        r = subprocess.run([self.bin, "--home", home, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"ferry {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def json(self, home, *args):
        r = self.cli(home, *args, "--json", check=False)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def folder(self, home):
        s = self.json(home, "status")
        if not s or not s.get("folders"):
            return None
        return s["folders"][0]

    def progress(self, home):
        return {k: v for k, v in (self.folder(home) or {}).items()
                if k in ("state", "files", "bytes", "need_items", "need_bytes", "error")}

    def start_agent(self, side, home):
        p = start([self.bin, "--home", home, "daemon", "--offline", "--listen", "127.0.0.1:0"],
                  f"{self.dir}/{side}.log", env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
        self.procs[side] = p
        wait_until(f"the ferry agent {side}", lambda: self.cli(home, "devices", check=False).returncode == 0, 30)
        return p

    def setup(self, src_tree, expect):
        """Homes, A's folder (a copy of src_tree), A's agent started and its
        first scan done; B's agent started. Returns A's scan seconds."""
        copy_tree(src_tree, self.a_dir)
        for side, home in (("A", self.a_home), ("B", self.b_home)):
            self.cli(home, "init", "--name", f"bench-{side}")
            cfg = f"{home}/config.toml"
            with open(cfg) as f:
                text = f.read()
            with open(cfg, "w") as f:
                text = text.replace("local_discovery = true", "local_discovery = false")
                # FERRY_BENCH_CONFIG="key = value;key2 = value2": settings to try (tuning).
                for setting in filter(None, os.environ.get("FERRY_BENCH_CONFIG", "").split(";")):
                    key = setting.split("=")[0].strip()
                    text = re.sub(rf"(?m)^#?\s*{re.escape(key)}\s*=.*$", setting.strip(), text, count=1)
                f.write(text)
        self.cli(self.a_home, "folder", "add", self.a_dir, "--id", "docs")
        t = time.time()
        self.start_agent("A", self.a_home)

        def scanned():
            f = self.folder(self.a_home)
            return f and f["files"] == expect["files"] and f["bytes"] == expect["bytes"] and f["state"] == "idle"
        wait_until("A's first scan", scanned, 600, progress=lambda: self.progress(self.a_home))
        scan_s = time.time() - t
        self.start_agent("B", self.b_home)
        return scan_s

    def wire(self):
        """(wire bytes in+out, chunk bytes in) on B's link to A."""
        d = self.json(self.b_home, "devices") or []
        for p in d:
            return p["bytes_in"] + p["bytes_out"], p["chunk_bytes_in"]
        return 0, 0

    def initial(self, expect):
        code = self.cli(self.a_home, "invite", "--folder", "docs").stdout.strip()
        cpu0 = {s: cpu_seconds(p.pid) for s, p in self.procs.items()}
        t0 = time.time()
        self.cli(self.b_home, "join", code, "--into", self.b_dir)

        def done():
            f = self.folder(self.b_home)
            return (f and f["need_items"] == 0 and f["files"] == expect["files"]
                    and f["bytes"] == expect["bytes"])
        wait_until("B's first sync", done, 1200, progress=lambda: self.progress(self.b_home))
        secs = time.time() - t0
        cpu = {s: cpu_seconds(p.pid) - cpu0[s] for s, p in self.procs.items()}
        wire, chunk = self.wire()
        return {"secs": secs, "wire": wire, "chunk_in": chunk, "cpu_a": cpu["A"], "cpu_b": cpu["B"]}

    def insert(self, corpus, expect):
        time.sleep(2)  # let index traffic after the first sync settle
        w0, c0 = self.wire()
        cpu0 = {s: cpu_seconds(p.pid) for s, p in self.procs.items()}
        target = os.path.join(self.b_dir, "big.bin")
        t0 = swap_in_insert(corpus, self.dir, self.a_dir)

        def done():
            try:
                return os.stat(target).st_size == expect["bytes"]
            except OSError:
                return False
        wait_until("B to have the inserted file", done, 600, every=0.02,
                   progress=lambda: self.progress(self.b_home))
        secs = time.time() - t0
        cpu = {s: cpu_seconds(p.pid) - cpu0[s] for s, p in self.procs.items()}
        w1, c1 = self.wire()
        wait_until("B's need list to empty", lambda: (self.folder(self.b_home) or {}).get("need_items") == 0, 60)
        time.sleep(1)
        w2, c2 = self.wire()
        return {"secs": secs, "wire": w2 - w0, "wire_at_done": w1 - w0, "chunk_in": c2 - c0,
                "cpu_a": cpu["A"], "cpu_b": cpu["B"]}

    def memory(self):
        return {s: proc_status(p.pid).get("VmHWM", 0) for s, p in self.procs.items()}

    def idle_cpu(self, secs):
        """Each agent's CPU use (fraction of one core) over `secs` of quiet."""
        c0 = {s: cpu_seconds(p.pid) for s, p in self.procs.items()}
        time.sleep(secs)
        return tuple((cpu_seconds(self.procs[s].pid) - c0[s]) / secs for s in ("A", "B"))

    def teardown(self):
        for p in self.procs.values():
            stop(p)


# --------------------------------------------------------------------- rsync

class FerryHolder(Ferry):
    """ferry with B as an encrypted backup holder of A's folder: the same
    corpus, sealed on A and stored on B (which cannot read it). Done when A
    counts the holder up to date; "stored" is what B keeps (sealed chunks
    and records) against the plaintext."""
    name = "ferry-holder"
    verifies_tree = False

    def holder_done(self, after_sequence=0):
        f = self.folder(self.a_home)
        hs = (f or {}).get("holders") or []
        return bool(hs) and f["sequence"] > after_sequence and all(h["up_to_date"] for h in hs)

    def stored(self):
        s = self.json(self.b_home, "status") or {}
        return sum(v["bytes"] for v in s.get("vaults") or [])

    def initial(self, expect):
        code = self.cli(self.a_home, "invite", "--folder", "docs", "--encrypted").stdout.strip()
        cpu0 = {s: cpu_seconds(p.pid) for s, p in self.procs.items()}
        t0 = time.time()
        self.cli(self.b_home, "join", code)
        wait_until("the holder to have everything", self.holder_done, 1200,
                   progress=lambda: self.progress(self.a_home))
        secs = time.time() - t0
        cpu = {s: cpu_seconds(p.pid) - cpu0[s] for s, p in self.procs.items()}
        wire, _ = self.wire()
        return {"secs": secs, "wire": wire, "cpu_a": cpu["A"], "cpu_b": cpu["B"],
                "stored": self.stored()}

    def insert(self, corpus, expect):
        time.sleep(2)
        w0, _ = self.wire()
        seq = self.folder(self.a_home)["sequence"]
        cpu0 = {s: cpu_seconds(p.pid) for s, p in self.procs.items()}
        t0 = swap_in_insert(corpus, self.dir, self.a_dir)
        wait_until("the holder to have the insert", lambda: self.holder_done(seq), 600, every=0.02)
        secs = time.time() - t0
        cpu = {s: cpu_seconds(p.pid) - cpu0[s] for s, p in self.procs.items()}
        time.sleep(1)
        w1, _ = self.wire()
        return {"secs": secs, "wire": w1 - w0, "cpu_a": cpu["A"], "cpu_b": cpu["B"]}


class Rsync:
    name = "rsync"

    def __init__(self, binary, run_dir):
        self.dir = run_dir
        self.a_dir, self.b_dir = f"{run_dir}/a-docs", f"{run_dir}/b-docs"
        self.daemon = None
        self.peak = {"A": 0, "B": 0}

    def setup(self, src_tree, expect):
        copy_tree(src_tree, self.a_dir)
        os.makedirs(self.b_dir)
        self.port = free_port()
        conf = f"{self.dir}/rsyncd.conf"
        with open(conf, "w") as f:
            f.write(f"pid file = {self.dir}/rsyncd.pid\nuse chroot = no\nuid = root\ngid = root\n"
                    f"[docs]\n  path = {self.a_dir}\n  read only = yes\n")
        self.daemon = start(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={self.port}",
                             "--address=127.0.0.1", f"--log-file={self.dir}/rsyncd.log"], f"{self.dir}/rsyncd.out")
        wait_until("the rsync daemon", lambda: port_open(self.port), 30)
        return None  # rsync has no index to build first

    flags = []

    def transfer(self):
        cmd = ["rsync", "-a", "--stats", *self.flags, f"rsync://127.0.0.1:{self.port}/docs/", self.b_dir + "/"]
        cpu_a, cpu_b = cpu_seconds(self.daemon.pid, children=True), os.times()
        t0 = time.time()
        client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = TreeSampler({"A": self.daemon.pid, "B": client.pid})
        sampler.start()
        out, err = client.communicate()
        secs = time.time() - t0
        t = os.times()
        cpu_b = t.children_user + t.children_system - cpu_b.children_user - cpu_b.children_system
        time.sleep(0.2)  # the daemon reaps its forked sender
        cpu_a = cpu_seconds(self.daemon.pid, children=True) - cpu_a
        peak = sampler.finish()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], peak[k])
        if client.returncode != 0:
            raise RuntimeError(f"rsync failed: {err.strip()}")

        def stat(label):
            m = re.search(rf"^{label}: ([\d,]+)", out, re.M)
            return int(m.group(1).replace(",", "")) if m else 0
        sent, recv = stat("Total bytes sent"), stat("Total bytes received")
        return {"secs": secs, "wire": sent + recv, "chunk_in": stat("Literal data"), "cpu_a": cpu_a, "cpu_b": cpu_b}

    def initial(self, expect):
        return self.transfer()

    def insert(self, corpus, expect):
        swap_in_insert(corpus, self.dir, self.a_dir)
        return self.transfer()  # timed from the start of the run: rsync is the "watcher"

    def memory(self):
        return dict(self.peak)

    def teardown(self):
        if self.daemon:
            stop(self.daemon)


class RsyncFsync(Rsync):
    """rsync with --fsync, as ferry and Syncthing make files durable: for
    context (the targets compare with plain rsync)."""
    name = "rsync-fsync"
    flags = ["--fsync"]


# ----------------------------------------------------------------- Syncthing

ST_KEY = "ferrybenchapikey"


class Syncthing:
    name = "syncthing"

    def __init__(self, binary, run_dir):
        self.bin = binary
        self.dir = run_dir
        self.a_dir, self.b_dir = f"{run_dir}/a-docs", f"{run_dir}/b-docs"
        self.homes = {"A": f"{run_dir}/A", "B": f"{run_dir}/B"}
        self.procs, self.gui, self.ids, self.inner = {}, {}, {}, {}
        self.env = dict(os.environ, HOME=run_dir, STNORESTART="1", STNOUPGRADE="1",
                        STNODEFAULTFOLDER="1", STGUIAPIKEY=ST_KEY)

    def rest(self, side, path, method="GET", body=None, timeout=30):
        req = urllib.request.Request(f"http://127.0.0.1:{self.gui[side]}{path}", method=method,
                                     headers={"X-API-Key": ST_KEY, "Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data.strip() else None

    def try_rest(self, side, path):
        try:
            return self.rest(side, path, timeout=10)
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def folder_xml(self, path, ids):
        f = ET.Element("folder", id="docs", label="docs", path=path, type="sendreceive",
                       rescanIntervalS="3600", fsWatcherEnabled="true", fsWatcherDelayS="10",
                       ignorePerms="false", autoNormalize="true")
        for i in ids:
            ET.SubElement(f, "device", id=i, introducedBy="")
        return f

    def configure(self, side, listen_port, peer_side, peer_port):
        cfg = f"{self.homes[side]}/config.xml"
        tree = ET.parse(cfg)
        root = tree.getroot()
        for f in root.findall("folder"):
            root.remove(f)
        opts = root.find("options")
        settings = {"listenAddress": f"tcp://127.0.0.1:{listen_port}", "globalAnnounceEnabled": "false",
                    "localAnnounceEnabled": "false", "relaysEnabled": "false", "natEnabled": "false",
                    "urAccepted": "-1", "autoUpgradeIntervalH": "0", "startBrowser": "false",
                    "crashReportingEnabled": "false", "setLowPriority": "false"}
        for k, v in settings.items():
            e = opts.find(k)
            if e is None:
                e = ET.SubElement(opts, k)
            e.text = v
        gui = root.find("gui")
        gui.find("address").text = f"127.0.0.1:{self.gui[side]}"
        gui.find("apikey").text = ST_KEY
        dev = ET.SubElement(root, "device", id=self.ids[peer_side], name=f"bench-{peer_side}",
                            compression="metadata", introducer="false", skipIntroductionRemovals="false",
                            introducedBy="")
        ET.SubElement(dev, "address").text = f"tcp://127.0.0.1:{peer_port}"
        ET.SubElement(dev, "paused").text = "false"
        ET.SubElement(dev, "autoAcceptFolders").text = "false"
        if side == "A":
            root.insert(0, self.folder_xml(self.a_dir, [self.ids["A"], self.ids["B"]]))
        tree.write(cfg)

    def start_agent(self, side):
        h = self.homes[side]
        p = start([self.bin, "serve", "--home", h, "--no-browser", "--no-restart", "--no-upgrade",
                   "--no-default-folder"], f"{self.dir}/{side}.log", env=self.env)
        self.procs[side] = p
        wait_until(f"Syncthing {side}'s REST API", lambda: self.try_rest(side, "/rest/system/ping"), 60)
        # Even with --no-restart, the Debian build runs a monitor process that
        # starts the real one as its child: measure that child (the monitor,
        # about 17 MiB, is left out).
        kids = children(p.pid)
        self.inner[side] = kids[0] if len(kids) == 1 else p.pid
        return p

    def db_status(self, side):
        return self.try_rest(side, "/rest/db/status?folder=docs")

    def progress(self, side):
        return {k: v for k, v in (self.db_status(side) or {}).items()
                if k in ("state", "localFiles", "localBytes", "needTotalItems", "needBytes", "pullErrors")}

    def setup(self, src_tree, expect):
        copy_tree(src_tree, self.a_dir)
        ports = {}
        for side in ("A", "B"):
            subprocess.run([self.bin, "generate", "--home", self.homes[side], "--no-default-folder"],
                           env=self.env, check=True, capture_output=True)
            self.ids[side] = subprocess.run([self.bin, "serve", "--home", self.homes[side], "--device-id"],
                                            env=self.env, check=True, capture_output=True,
                                            text=True).stdout.strip()
            self.gui[side] = free_port()
            ports[side] = free_port()
        self.configure("A", ports["A"], "B", ports["B"])
        self.configure("B", ports["B"], "A", ports["A"])
        t = time.time()
        self.start_agent("A")

        def scanned():
            s = self.db_status("A")
            return s and s.get("state") == "idle" and s.get("localFiles") == expect["files"]
        wait_until("Syncthing A's first scan", scanned, 600, every=0.2, progress=lambda: self.progress("A"))
        scan_s = time.time() - t
        self.start_agent("B")

        def connected():
            c = self.try_rest("B", "/rest/system/connections")
            return c and c["connections"].get(self.ids["A"], {}).get("connected")
        wait_until("Syncthing B to connect to A", connected, 120, every=0.2)
        return scan_s

    def wire(self):
        c = self.try_rest("B", "/rest/system/connections") or {}
        t = c.get("total", {})
        return t.get("inBytesTotal", 0) + t.get("outBytesTotal", 0)

    def initial(self, expect):
        w0 = self.wire()
        cpu0 = {s: cpu_seconds(p) for s, p in self.inner.items()}
        t0 = time.time()
        body = {"id": "docs", "label": "docs", "path": self.b_dir, "type": "sendreceive",
                "devices": [{"deviceID": self.ids["A"]}, {"deviceID": self.ids["B"]}],
                "rescanIntervalS": 3600, "fsWatcherEnabled": True, "fsWatcherDelayS": 10}
        self.rest("B", "/rest/config/folders", "POST", body)

        def done():
            # (its byte counts include 128 bytes per directory: compare files)
            s = self.db_status("B")
            return (s and s.get("state") == "idle" and s.get("needTotalItems") == 0
                    and s.get("localFiles") == expect["files"] and s.get("globalFiles") == expect["files"])
        wait_until("Syncthing B's first sync", done, 1200, every=0.1, progress=lambda: self.progress("B"))
        secs = time.time() - t0
        cpu = {s: cpu_seconds(p) - cpu0[s] for s, p in self.inner.items()}
        return {"secs": secs, "wire": self.wire() - w0, "cpu_a": cpu["A"], "cpu_b": cpu["B"]}

    def insert(self, corpus, expect):
        time.sleep(2)
        w0 = self.wire()
        cpu0 = {s: cpu_seconds(p) for s, p in self.inner.items()}
        target = os.path.join(self.b_dir, "big.bin")
        t0 = swap_in_insert(corpus, self.dir, self.a_dir)
        # Its watcher would wait fsWatcherDelayS (10 s) first: ask for the scan
        # at once instead, as a user waiting for it would.
        self.rest("A", "/rest/db/scan?folder=docs&sub=big.bin", "POST")

        def done():
            try:
                return os.stat(target).st_size == expect["bytes"]
            except OSError:
                return False
        wait_until("Syncthing B to have the inserted file", done, 600, every=0.02,
                   progress=lambda: self.progress("B"))
        secs = time.time() - t0
        cpu = {s: cpu_seconds(p) - cpu0[s] for s, p in self.inner.items()}
        w1 = self.wire()
        wait_until("Syncthing B idle", lambda: (self.db_status("B") or {}).get("needFiles") == 0, 60)
        time.sleep(1)
        return {"secs": secs, "wire": self.wire() - w0, "wire_at_done": w1 - w0,
                "cpu_a": cpu["A"], "cpu_b": cpu["B"]}

    def memory(self):
        return {s: proc_status(p).get("VmHWM", 0) for s, p in self.inner.items()}

    def idle_cpu(self, secs):
        c0 = {s: cpu_seconds(p) for s, p in self.inner.items()}
        time.sleep(secs)
        return tuple((cpu_seconds(self.inner[s]) - c0[s]) / secs for s in ("A", "B"))

    def teardown(self):
        for side, p in self.procs.items():
            try:
                self.rest(side, "/rest/system/shutdown", "POST", timeout=5)
                p.wait(20)
            except Exception:
                pass
            stop(p)


# ------------------------------------------------------------------ scenarios

CACHE = {"dropped": None}


def same_start(srcs):
    """Every scenario starts from the same machine state: earlier runs'
    writeback done (sync), the page cache emptied of their files (which
    otherwise fill RAM after a few runs, so that later runs pay for reclaim
    in their own CPU and time), and then the scenario's corpus read back in
    (the figures are for a warm cache). Dropping the cache needs root; without
    it, only the sync and the re-read are done (the report says which)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        CACHE["dropped"] = CACHE["dropped"] is not False
    except OSError:
        CACHE["dropped"] = False
    for src in srcs:
        for d, _, files in os.walk(src):
            for n in files:
                with open(os.path.join(d, n), "rb") as f:
                    while f.read(1 << 20):
                        pass


def run_scenario(tool_cls, binary, base, corpus, manifest, kind, run, keep):
    """kind: "small" (initial sync of the small files) or "large" (initial
    sync of the 1 GiB file, then the insert). Returns {row: value}."""
    run_dir = os.path.join(base, f"run{run}-{tool_cls.name}-{kind}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    src = os.path.join(corpus, "small" if kind == "small" else "large")
    same_start([src] if kind == "small" else [src, os.path.join(corpus, "insert")])
    tool = tool_cls(binary, run_dir)
    out = {}
    try:
        expect = manifest["small"] if kind == "small" else manifest["large_tree"]
        scan_s = tool.setup(src, expect)
        if scan_s is not None:
            out[f"{kind}.scan_a"] = scan_s
        busy = machine_busy()
        r = tool.initial(expect)
        r["other"] = machine_busy() - busy - r.get("cpu_a", 0) - r.get("cpu_b", 0)
        # Peak memory as the sync completes (VmHWM only grows; the large
        # scenario reads it again after the insert).
        mem = tool.memory()
        bad = verify_tree(tool.b_dir, expect) if getattr(tool, "verifies_tree", True) else None
        if bad:
            raise RuntimeError(f"{tool.name} {kind}: B's tree differs from the corpus: {bad}")
        for k, v in r.items():
            out[f"{kind}.{k}"] = v
        if kind == "large":
            busy = machine_busy()
            r = tool.insert(corpus, manifest["insert_tree"])
            r["other"] = machine_busy() - busy - r.get("cpu_a", 0) - r.get("cpu_b", 0)
            bad = (verify_tree(tool.b_dir, manifest["insert_tree"])
                   if getattr(tool, "verifies_tree", True) else None)
            if bad:
                raise RuntimeError(f"{tool.name} insert: B's file differs: {bad}")
            for k, v in r.items():
                out[f"insert.{k}"] = v
            mem = tool.memory()
        elif hasattr(tool, "idle_cpu"):
            # Should be about zero: nothing changes any more.
            out["small.idle_a"], out["small.idle_b"] = tool.idle_cpu(IDLE_SECS)
        out[f"{kind}.rss_a"], out[f"{kind}.rss_b"] = mem["A"], mem["B"]
    finally:
        tool.teardown()
        if not keep:
            # Removed after all runs, not now: on an ext4 without a journal
            # (as here), creating files soon after a mass delete is much
            # slower (the kernel skips recently freed inodes), which would
            # charge the next tool for this one's cleanup.
            LEFT_OVER.append(run_dir)
    return out


LEFT_OVER = []


# ---------------------------------------------------------------------- report

ROWS = [
    # key, label, unit
    ("small.secs", "small files: initial sync", "s"),
    ("small.wire", "small files: wire bytes", "MB"),
    ("small.rss_a", "small files: peak RSS, sender A", "MiB"),
    ("small.rss_b", "small files: peak RSS, receiver B", "MiB"),
    ("small.cpu_a", "small files: CPU during sync, A", "s"),
    ("small.cpu_b", "small files: CPU during sync, B", "s"),
    ("small.other", "small files: other CPU on the machine", "s"),
    ("small.scan_a", "small files: A's first scan (untimed)", "s"),
    ("small.stored", "small files: stored on a holder", "MB"),
    ("small.idle_a", "small files: A's CPU when idle after it", "%"),
    ("small.idle_b", "small files: B's CPU when idle after it", "%"),
    ("large.secs", "1 GiB file: initial sync", "s"),
    ("large.wire", "1 GiB file: wire bytes", "MB"),
    ("large.rss_a", "1 GiB file + insert: peak RSS, sender A", "MiB"),
    ("large.rss_b", "1 GiB file + insert: peak RSS, receiver B", "MiB"),
    ("large.cpu_a", "1 GiB file: CPU during sync, A", "s"),
    ("large.cpu_b", "1 GiB file: CPU during sync, B", "s"),
    ("large.other", "1 GiB file: other CPU on the machine", "s"),
    ("large.scan_a", "1 GiB file: A's first scan (untimed)", "s"),
    ("large.stored", "1 GiB file: stored on a holder", "MB"),
    ("insert.secs", "100-byte insert: seconds until B has it", "s"),
    ("insert.wire", "100-byte insert: wire bytes", "MB"),
    ("insert.chunk_in", "100-byte insert: file data received", "MB"),
    ("insert.cpu_a", "100-byte insert: CPU, A", "s"),
    ("insert.cpu_b", "100-byte insert: CPU, B", "s"),
    ("insert.other", "100-byte insert: other CPU on the machine", "s"),
]

TARGETS = {  # the reference figures (medians, this kind of machine)
    "small.secs": {"syncthing": 14, "rsync": 6},
    "large.secs": {"syncthing": 5.8, "rsync": 2.4},
    "insert.wire": {"syncthing": 1.4e6, "rsync": 0.56e6},
    "insert.secs": {"rsync": 3.8},
}


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "MB":
        return f"{v / 1e6:.3f}" if v < 10e6 else f"{v / 1e6:.1f}"
    if unit == "MiB":
        return f"{v / MIB:.0f}"
    if unit == "%":
        return f"{v * 100:.0f}"
    return f"{v:.2f}"


def median(vals):
    vals = [v for v in vals if v is not None and v == v]
    return statistics.median(vals) if vals else None


def report(results, tools, runs, facts, cmdline):
    print()
    print(f"command: {cmdline}")
    for k, v in facts.items():
        print(f"{k}: {v}")
    print(f"medians of {runs} run(s); MB = 10^6 bytes, MiB = 2^20; loopback; warm page cache")
    print("'other CPU' = the machine's busy CPU seconds in the timed window minus both sides' own:")
    print("the bench's own polling (about 0.04 s per second) plus anything else running: if large, rerun")
    print()
    med = {t: {k: median([r.get(k) for r in results[t]]) for k, _, _ in ROWS} for t in tools}
    w = 42
    header = f"{'':{w}} {'unit':>4} " + " ".join(f"{t:>10}" for t in tools)
    print(header)
    print("-" * len(header))
    for key, label, unit in ROWS:
        if all(med[t][key] is None for t in tools):
            continue
        print(f"{label:{w}} {unit:>4} " + " ".join(f"{fmt(med[t][key], unit):>10}" for t in tools))
    print()
    print("per run:")
    for t in tools:
        for i, r in enumerate(results[t]):
            print(f"  {t} run {i + 1}: " + ", ".join(f"{k}={fmt(r[k], u)}" for k, _, u in ROWS if k in r))
    print()
    # Targets: the issue's, against this run's measured peers when present.
    if "ferry" not in med:
        return med
    f = med["ferry"]
    checks = []

    def against(label, key, peer, limit_of, ok, show):
        """One target, judged against the peer measured in this run (when it
        ran) and against the issue's figure for that peer."""
        if f[key] is None:
            return
        refs = []
        if peer in med and med[peer][key] is not None:
            refs.append(("measured", med[peer][key]))
        refs.append(("issue", TARGETS[key][peer]))
        verdicts = []
        for src, v in refs:
            lim = limit_of(v)
            verdicts.append(f"{'met' if ok(f[key], lim) else 'MISSED'} vs {src} {peer} {show(v)} (limit {show(lim)})")
        checks.append((label, ok(f[key], limit_of(refs[0][1])), f"{show(f[key])}: " + "; ".join(verdicts)))

    secs = lambda v: f"{v:.2f} s"
    mb = lambda v: f"{v / 1e6:.3f} MB"
    against("small files in under half Syncthing's time", "small.secs", "syncthing",
            lambda v: v / 2, lambda x, lim: x < lim, secs)
    against("1 GiB file at least as fast as Syncthing", "large.secs", "syncthing",
            lambda v: v, lambda x, lim: x <= lim, secs)
    against("insert: fewer wire bytes than rsync", "insert.wire", "rsync",
            lambda v: v, lambda x, lim: x < lim, mb)
    against("insert: less time than rsync", "insert.secs", "rsync",
            lambda v: v, lambda x, lim: x < lim, secs)
    if f["small.idle_a"] is not None:
        idle = max(f["small.idle_a"], f["small.idle_b"])
        checks.append(("agents idle once in sync (under 2% of a core)", idle < 0.02,
                       f"{idle * 100:.0f}% of a core"))
    keys = [k for k in ("small.rss_a", "small.rss_b", "large.rss_a", "large.rss_b") if f[k] is not None]
    st = med.get("syncthing")
    if keys and st and all(st[k] is not None for k in keys):
        # Side by side: each agent's peak against Syncthing's in the same role.
        worse = [f"{k} {f[k] / MIB:.0f} vs {st[k] / MIB:.0f}" for k in keys if f[k] >= st[k]]
        checks.append(("agent peak RSS below Syncthing's, per scenario and side (measured)", not worse,
                       "above in " + ", ".join(worse) + " MiB" if worse else
                       "max " + f"{max(f[k] for k in keys) / MIB:.0f} MiB"))
    elif keys:
        top = max(f[k] for k in keys)
        checks.append(("agent peak RSS below Syncthing's (issue: 80-130 MB, so under 80 MB)", top < 80e6,
                       f"max {top / MIB:.0f} MiB"))
    if f["small.rss_b"] is not None and f["large.rss_b"] is not None:
        a = max(f["small.rss_a"], f["small.rss_b"])
        b = max(f["large.rss_a"], f["large.rss_b"])
        checks.append(("memory flat in file size (1 GiB file vs 330 MB of small files, within 25%)",
                       b <= a * 1.25, f"max {b / MIB:.0f} vs {a / MIB:.0f} MiB"))
    if checks:
        print("targets (ferry):")
        for what, ok, val in checks:
            print(f"  [{'met' if ok else 'MISSED'}] {what}: ferry {val}")
    return med


def machine_facts(ferry_bin, tools):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            mem[k] = int(v.split()[0]) * 1024
    facts = {
        "machine": f"{os.cpu_count()} cpus (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
                   f"{mem['MemTotal'] / 2**30:.1f} GiB RAM, {mem['MemAvailable'] / 2**30:.1f} GiB available, "
                   f"kernel {os.uname().release}",
    }
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rev = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    built = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(ferry_bin)))
    vers = [f"ferry binary {ferry_bin} (built {built}; source tree here: {rev or '?'})"]
    if "rsync" in tools:
        vers.append(subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
    if "syncthing" in tools:
        vers.append(subprocess.run(["syncthing", "--version"], capture_output=True, text=True).stdout.split(" (")[0])
    facts["versions"] = "; ".join(vers)
    facts["load average at start"] = " ".join(open("/proc/loadavg").read().split()[:3])
    return facts


def main():
    ap = argparse.ArgumentParser(prog="benches/sync.sh")
    ap.add_argument("--runs", type=int, default=3)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--small-only", action="store_true")
    g.add_argument("--large-only", action="store_true")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--work", default="/tmp/ferry-bench")
    ap.add_argument("--keep", action="store_true", help="keep each run's directories")
    ap.add_argument("--tools", help="comma-separated subset of ferry,ferry-holder,rsync,rsync-fsync,syncthing "
                    "(ferry-holder: B holds A's folder encrypted; rsync-fsync: rsync --fsync)")
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--cmdline", default="")
    a = ap.parse_args()

    tools = ["ferry"] + (["rsync", "syncthing"] if a.compare else [])
    if a.tools:
        tools = [t for t in ("ferry", "ferry-holder", "rsync", "rsync-fsync", "syncthing")
                 if t in a.tools.split(",")]
    kinds = ["small"] * (not a.large_only) + ["large"] * (not a.small_only)
    classes = {"ferry": Ferry, "ferry-holder": FerryHolder, "rsync": Rsync, "rsync-fsync": RsyncFsync,
               "syncthing": Syncthing}
    binaries = {"ferry": a.ferry, "ferry-holder": a.ferry, "rsync": "rsync", "rsync-fsync": "rsync",
                "syncthing": "syncthing"}

    os.makedirs(a.work, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        corpus, manifest = make_corpus(a.work)
        facts = machine_facts(a.ferry, tools)
        results = {t: [] for t in tools}
        t_all = time.time()
        for run in range(1, a.runs + 1):
            for t in tools:
                r = {}
                for kind in kinds:
                    log(f"run {run}/{a.runs}: {t}, {kind}...")
                    r.update(run_scenario(classes[t], binaries[t], a.work, corpus, manifest, kind, run, a.keep))
                    shown = (kind, "insert") if kind == "large" else (kind,)
                    log("  " + ", ".join(f"{k}={fmt(r[k], u)}" for k, _, u in ROWS
                                         if k in r and k.split(".")[0] in shown))
                results[t].append(r)
        log(f"all runs took {time.time() - t_all:.0f} s")
        facts["load average at end"] = " ".join(open("/proc/loadavg").read().split()[:3])
        facts["before each scenario"] = (
            "sync, page cache dropped, corpus re-read" if CACHE["dropped"]
            else "sync, corpus re-read (page cache not dropped: needs root)")
        with open(os.path.join(a.work, "results.json"), "w") as f:
            json.dump({"facts": facts, "results": results}, f, indent=1)
        report(results, tools, a.runs, facts, a.cmdline)
        print(f"\n(raw figures: {os.path.join(a.work, 'results.json')}; corpus kept in {corpus})")
    finally:
        stop_all()
        for d in LEFT_OVER:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
