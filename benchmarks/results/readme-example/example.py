import torch.nn as nn
import edgetrain.api as et

def conv(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())

blocks = [conv(1, 32), conv(32, 32), conv(32, 64, 2), conv(64, 64)]
trained = et.fit(blocks, modules=2, epochs=1, out="runs/my-cnn")   # built-in Fashion-MNIST
print(trained.report["test_accuracy"])       # trained.network: modules + last head

