"""One exception type for mistakes a user can fix (bad config, bad file, wrong device).

Entry points catch it and print its message as one line, without a traceback: the message must
name the key, file or line and say what is allowed.
"""


class UserError(Exception):
    pass
