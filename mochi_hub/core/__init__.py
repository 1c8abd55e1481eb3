"""The small base every layer stands on: atomic files, named seed streams, processes (Accelerate), the console."""
