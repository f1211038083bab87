"""The job runners: an image batch (`images`) and a video (`video`), each planned and checked before
any work starts, then run with progress callbacks, one-line errors naming the file at fault,
atomic writes and a result to summarise. The command line and the Ray cluster drive them."""
