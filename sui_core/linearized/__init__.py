"""The network linearized at w0, exactly: per-sample Jacobians and their projections (jacobians), the
kernel eigenbasis (ntk), the closed-form leave-one-out solver (solver), F-SI/SI scores (scores), the
whole estimate in memory (estimate), and slow independent references for tests (reference)."""
