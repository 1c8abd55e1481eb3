"""The data: dataset sources, MoCo-v2's views (in workers or on the device) and the seeded batch order."""
