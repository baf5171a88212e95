"""MoCo v3 (Chen, Xie, He, ICCV 2021) as a small library: every script of this repository is a thin
command line over these modules."""
