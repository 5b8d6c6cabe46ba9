"""TPU platform via XLA (torch-xla / PJRT): Pallas ragged paged attention, static shape buckets."""
