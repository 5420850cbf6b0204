"""Proposal generators: selective search, anchors and the RPN."""
