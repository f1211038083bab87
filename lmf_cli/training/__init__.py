"""Training: the recipe (`config`), batches (`data`), the resumable loop (`loop`) and CMSR
calibration (`calibrate`, which fits tables rather than weights)."""
