"""The converted model at run time: scales, the routing rule, the call route, S-BN, sampling.

Imports nothing above it: conversion, training, serving, checkpoints and deployment build on it.
"""
