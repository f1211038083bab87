"""Files in and out: images (`images`: bit depth, alpha, orientation, metadata, atomic writes)
and videos (`video`: planning, decoding, resumable segments, muxing). Running jobs is `lmf_cli.jobs`."""
