"""Reliable transactional messaging: send, deliver, acknowledge, resend, dedupe."""
