"""Stable-Pix2Seq: Pix2Seq object detection."""
