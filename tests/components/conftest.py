"""Fixtures of the component tests."""

import pytest

#: A pinned image reference for tests that compile or harden tasks without running them (the
#: all-zero placeholder is refused; no registry is asked for this one).
TEST_IMAGE = "registry.example/stepguard-runtime@sha256:" + "5" * 64


@pytest.fixture
def pods_image(monkeypatch: pytest.MonkeyPatch) -> str:
    """``pods.image`` set to :data:`TEST_IMAGE` for the test."""
    monkeypatch.setenv("STEPGUARD_PODS_IMAGE", TEST_IMAGE)
    return TEST_IMAGE
