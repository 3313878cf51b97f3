"""GPU visibility in the sandbox: present with gpus=1, absent with gpus=0.

Runs only on a machine with an NVIDIA driver (``/dev/nvidia0``); standalone with
``pytest tests/sdk/isolation -k gpu``.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from stepguard.isolation import run_isolated
from stepguard.spec import IsolationSpec

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
    pytest.mark.skipif(not os.path.exists("/dev/nvidia0"), reason="no NVIDIA GPU on this machine"),
]

PROBE = r"""
import ctypes, glob, os, shutil, subprocess
print('DEVICES', sorted(glob.glob('/dev/nvidia*')))
smi = shutil.which('nvidia-smi')
try:
    r = subprocess.run([smi or 'nvidia-smi', '-L'], capture_output=True, text=True, timeout=60)
    print('SMI', r.returncode, r.stdout.strip().replace('\n', ' | '))
except OSError as e:
    print('SMI', 'unavailable', type(e).__name__)
try:
    cuda = ctypes.CDLL('libcuda.so.1')
    rc = cuda.cuInit(0)
    n = ctypes.c_int(0)
    rc2 = cuda.cuDeviceGetCount(ctypes.byref(n))
    print('CUDA', rc, rc2, n.value)
except OSError as e:
    print('CUDA', 'unloadable')
"""


def _probe(gpus: int, tmp_path: object) -> str:
    log = os.path.join(str(tmp_path), f"gpu{gpus}.log")
    res = run_isolated([sys.executable, "-c", PROBE], IsolationSpec(mode="sandbox", gpus=gpus),
                       deadline_s=120, stdout=log, stderr=log + ".err")
    text = open(log).read()
    assert res.exit_code == 0, text + open(log + ".err").read()
    assert res.gpus_visible == (gpus > 0)
    return text


def test_gpu_visible_with_gpus_1(tmp_path: object) -> None:
    text = _probe(1, tmp_path)
    assert "/dev/nvidia0" in text and "/dev/nvidiactl" in text
    assert "SMI 0 GPU 0:" in text, text
    assert "CUDA 0 0 1" in text, text


def test_gpu_absent_with_gpus_0(tmp_path: object) -> None:
    text = _probe(0, tmp_path)
    assert "DEVICES []" in text
    assert "SMI 0" not in text
    assert "CUDA 0 " not in text, text
