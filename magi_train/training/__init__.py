"""The training program: the trainer loop, its objectives and callbacks, evaluation, and run control."""
