"""The small base every layer stands on: atomic files, named seed streams, processes (Accelerate), memory checked
before a job starts, the console."""
