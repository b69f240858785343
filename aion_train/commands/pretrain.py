"""placeholder until implemented"""

def add_arguments(p):
    pass


def run(args):
    print("not available yet")
    return 1
