"""Small pieces shared by every package: the user-facing error type and progress reporting."""
