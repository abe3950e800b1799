"""Model weights from elsewhere: the official Pix2Seq checkpoints (conversion of their TensorFlow
checkpoints, :mod:`.convert`; download and ``official:NAME``, :mod:`.official`) and the
``pix2seq weights ...`` command group (:mod:`.commands`)."""
