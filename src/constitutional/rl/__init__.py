"""Reinforcement learning from AI feedback (RL-CAI, step 9 of Bai et al. 2022): the SL-CAI policy is
trained with PPO against the preference model's scores, with a per-token KL penalty that keeps it close
to the frozen SL-CAI reference. `constitutional.rl.ppo` holds the math of that stage as small pure torch
functions (KL estimators, per-token rewards, GAE, clipped losses, KL controllers); importing this
package is cheap, torch is imported only by the modules that need it.
"""
