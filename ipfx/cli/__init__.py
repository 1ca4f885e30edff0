"""The command line: ``ipfx demo | compare | inspect | build-native`` (:mod:`.main`), its argument
parsing (:mod:`.args`), the demo (:mod:`.demo`) and what ``inspect`` says about a file (:mod:`.inspect`).

May import anything in ipfx; nothing in ipfx imports it.
"""
