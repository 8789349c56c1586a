"""Models, data, partitions and simulated attacks for the example federation."""
