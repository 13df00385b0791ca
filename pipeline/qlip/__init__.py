"""QLIP: T2Q (text -> predicted quality), its GIQA targets, Q2B (quality ->
layer- and step-wise activation bits), Q2B training, quality sources and the
text-aware QLIPPipeline."""
