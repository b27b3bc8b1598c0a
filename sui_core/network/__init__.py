"""The real network: architectures and w0 (models), real full-batch training (training), and
pretraining on a disjoint task (pretrain)."""
