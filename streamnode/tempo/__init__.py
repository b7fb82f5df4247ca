"""Tempo: where the node is in the music, and what follows it.

A clock (clock.py: the internal free-running BPM; link.py: Ableton Link; midi_clock.py: MIDI
clock in) answers "which beat is it at time t"; quantize.py holds changes until a beat or a bar,
lfo.py turns beats or seconds into modulation, cues.py steps a cue list on the beat, midi_ports.py
opens MIDI inputs. Imports only live_params and log_limit (docs/tempo.md); node/tempo.py wires
it to the engine thread.
"""
