"""Stable-Pix2Seq: Pix2Seq object detection."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stable-pix2seq")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
