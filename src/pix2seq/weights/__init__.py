"""The official Pix2Seq weights: conversion of their TensorFlow checkpoints (:mod:`.convert`) and
the ``pix2seq weights ...`` command group (:mod:`.commands`)."""
