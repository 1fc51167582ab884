"""The Kubernetes provider: PVCs, VolumeSnapshots, pods and Jobs; the only user of ``kubernetes``."""
