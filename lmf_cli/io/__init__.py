"""Files in and out: images (`images`: bit depth, alpha, orientation, metadata, atomic writes)
and videos (`video`: planning, the pipeline, resumable segments, muxing)."""
