"""Spec files shipped with verify: ``verify check --example`` runs backprop.vspec."""
