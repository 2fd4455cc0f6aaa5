"""Measuring helpers shared by the benchmarks (run.py: conversion, quantize.py: quantization).

measure(cmd, log)  runs one command under `/usr/bin/time -v`, samples /proc/PID/status of its process tree every
                   20 ms (peak RssAnon / RssFile / RssShmem) and records the CPU seconds the rest of the machine
                   used meanwhile (other_cpu_s); wait_quiet() waits for the rest of the machine to go idle;
                   warm() reads files into the page cache; sync_time() times a `sync`; machine_info() describes
                   the machine, the kernel and the git revision. See run.py's docstring for the method.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _status_kib(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    res, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    for c in f.read().split():
                        res.append(int(c))
                        todo.append(int(c))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return res


def _parse_time_v(text: str) -> dict:
    def grab(label, conv=float):
        m = re.search(rf"^\s*{re.escape(label)}:\s*(.+)$", text, re.M)
        return conv(m.group(1).strip()) if m else None

    def wall(s):
        parts = [float(x) for x in s.split(":")]
        sec = 0.0
        for p in parts:
            sec = sec * 60 + p
        return sec
    return {
        "wall_s_timev": grab("Elapsed (wall clock) time (h:mm:ss or m:ss)", wall),
        "user_s": grab("User time (seconds)"),
        "sys_s": grab("System time (seconds)"),
        "cpu_pct": grab("Percent of CPU this job got", lambda s: float(s.rstrip("%")) if s.rstrip("%").isdigit() else None),
        "max_rss_kib": grab("Maximum resident set size (kbytes)", int),
        "major_faults": grab("Major (requiring I/O) page faults", int),
        "involuntary_cs": grab("Involuntary context switches", int),
        "exit_status": grab("Exit status", int),
    }


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all CPUs; /proc/stat, excluding idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def wait_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (at most max_wait_s) until the rest of the machine uses < threshold cores over 1 s; returns the wait."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        b0 = cpu_busy_s()
        time.sleep(1.0)
        if cpu_busy_s() - b0 < threshold:
            break
    return time.perf_counter() - t0


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    tfile = log.with_suffix(".time")
    busy0 = cpu_busy_s()
    full = ["/usr/bin/time", "-v", "-o", str(tfile)] + cmd
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    peaks = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    t0 = time.perf_counter()
    with open(log, "wb") as lf:
        p = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=env)
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                for d in _descendants(p.pid):
                    for k, v in _status_kib(d).items():
                        if k in peaks:
                            peaks[k] = max(peaks[k], v)
                stop.wait(0.02)
        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = p.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    busy = cpu_busy_s() - busy0
    r = _parse_time_v(tfile.read_text()) if tfile.exists() else {}
    # CPU seconds used by everything else on the machine during the run (noise indicator): machine busy time
    # minus the measured command's user+sys (the poller thread of this script is included, a few % of a core).
    r["other_cpu_s"] = max(0.0, busy - (r.get("user_s") or 0) - (r.get("sys_s") or 0))
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed (rc {rc}): {' '.join(cmd)}\n--- log tail ---\n{tail}")
    r.update(wall_s=wall, loadavg_before=[float(x) for x in loadavg],
             peak_rss_anon_kib=peaks["RssAnon"], peak_rss_file_kib=peaks["RssFile"],
             peak_rss_shmem_kib=peaks["RssShmem"])
    return r


def sync_time() -> float:
    t0 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def warm(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run("cat " + " ".join(f"'{f}'" for f in files) + " > /dev/null", shell=True, check=True)
    return time.perf_counter() - t0


def rm(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ------------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_no = re.search(r"^Model:\s+(\d+)", lscpu, re.M)
        hyp = re.search(r"^Hypervisor vendor:\s+(\S+)", lscpu, re.M)
    except FileNotFoundError:
        model_no = hyp = None
    df = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", "/tmp"], capture_output=True, text=True).stdout
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "cpu_model_number": model_no.group(1) if model_no else None,
        "hypervisor": hyp.group(1) if hyp else None, "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(), "disk_tmp": df.strip(),
        "git_rev": git.stdout.strip() + ("-dirty" if dirty else ""),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
    }


def private_copy(src: Path, dst: Path) -> dict:
    """Copy a binary to dst and describe it (sha256, size, mtime): benchmarks measure the copy, because the
    original (target/release/...) may be rebuilt by someone else while they run."""
    import hashlib
    shutil.copy2(src, dst)
    st = dst.stat()
    return {"source": str(src), "path": str(dst), "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
            "size": st.st_size,
            "mtime_utc": dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")}


def changed_since(info: dict) -> bool:
    """Whether the original of a private_copy() differs now from the copy that was measured."""
    import hashlib
    src = Path(info["source"])
    return not src.exists() or hashlib.sha256(src.read_bytes()).hexdigest() != info["sha256"]
