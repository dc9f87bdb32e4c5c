"""The demo's sample picture, drawn in code (no binary in the repo): a sign with text on it."""

from PIL import Image, ImageDraw


def sample_image() -> Image.Image:
    image = Image.new("RGB", (640, 480), (135, 190, 235))          # sky
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 360, 640, 480), fill=(90, 150, 70))          # grass
    draw.rectangle((300, 250, 340, 420), fill=(110, 80, 50))        # post
    draw.rectangle((150, 110, 490, 270), fill=(250, 250, 245), outline=(200, 30, 30), width=8)
    draw.text((200, 170), "OWL2  EDGE", fill=(20, 20, 20), font_size=44)
    return image
