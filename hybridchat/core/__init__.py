"""Leaves every layer may use: user errors, atomic writes, the document record, answer metrics."""
