"""The trainer: data -> models -> losses -> loop, plus recognition and evaluation. Never imports bpy."""
